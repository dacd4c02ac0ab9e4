"""The scheduler side is pure CPU Python: importing it (and running it) never pulls in torch or cupy."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import sys
import services.scheduler.service, services.scheduler.sim.simulate, services.scheduler.sim.contiguous
import services.scheduler.sim.fake_executor, services.scheduler.scheduler, services.scheduler.step_loop
import services.scheduler.executor_channel, services.scheduler.cli, shared.config
from services.scheduler.sim.simulate import simulate
simulate("mixed", num_requests=3, num_blocks=128, block_size=16, max_model_len=4096, seed=0)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cupy", "transformers"))
print(heavy)
sys.exit(1 if heavy else 0)
"""


def test_scheduler_service_and_simulator_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scheduler_subcommand_help_does_not_import_torch():
    code = ("import sys, runpy; sys.argv = ['pagedserve', 'scheduler', '--help']\n"
            "try:\n    runpy.run_module('services.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_structured_outputs_in_the_scheduler_do_not_import_torch():
    """The grammar backend loads the model's tokenizer (transformers' torch-free tokenizer
    classes) and llguidance, compiles and fills masks: torch stays out."""
    code = ("import sys\n"
            "from services.scheduler.grammar import GrammarBackend, TokenizerLoader\n"
            "from shared.messages import GrammarSpec\n"
            "backend = GrammarBackend(TokenizerLoader('').bind(49152, [2]), 49152)\n"
            "m = backend.matcher(GrammarSpec('json_object'))\n"
            "assert len(backend.fill_masks([m])) == 49152 // 8\n"
            "heavy = sorted(x for x in sys.modules if x.split('.')[0] in ('torch', 'cupy'))\n"
            "print(heavy)\n"
            "sys.exit(1 if heavy else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
