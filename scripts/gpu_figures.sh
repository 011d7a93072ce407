#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one run, on a machine with one CUDA GPU (prints everything):
# the SPSA step against its floor and full-gradient mixing in bfloat16 (BERT-base and GPT-2), the measured
# peak against the memory estimate, and the CUDA code paths of the test suite (blend engine, merges).
#
#   bash scripts/gpu_figures.sh            # from the repository root; hf-glue installed (pip install -e .)
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python scripts/bench_step.py --device cuda --dtype bfloat16 --model bert-base --experts 2 4 8 --repeats 5
python scripts/bench_step.py --device cuda --dtype bfloat16 --model gpt2 --experts 2 4 8 --repeats 5
# the suite's engine and merge tests on the GPU (the suite needs none; here the CUDA paths run)
python -m pytest -q -p no:cacheprovider tests/test_blend.py tests/test_merge.py
