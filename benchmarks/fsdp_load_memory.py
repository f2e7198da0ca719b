"""Peak host memory (RSS) of each rank while --fsdp loads and shards one model, on 2 CPU ranks (gloo).

With --fsdp, rank 0 loads each model on its CPU and every other rank builds it on the meta device (no memory);
infra.parallel.shard_model then gives each rank its shards of rank 0's weights and rank 0's buffers. --every_rank_loads
loads the model on every rank's CPU instead (what the trainers did before), for comparison. The model: a random
Llama built from a config (hidden 1024, intermediate 2816, 12 layers, vocabulary 32000: 220M parameters, 838 MiB in
fp32), saved in a temporary folder and loaded as a trained role is (fp32 master weights).

    python benchmarks/fsdp_load_memory.py                      # rank 0 loads, the others get their shards
    python benchmarks/fsdp_load_memory.py --every_rank_loads   # each rank loads the whole model first

Each rank prints its peak RSS (VmHWM) before and after loading + sharding, and the size of its own fp32 shards.
On a GPU the shards live in GPU memory; on these CPU ranks they are part of the RSS. It prints figures and asserts
nothing about them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def peak_rss_mib() -> float:
    return [int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]


def rank_main(model_dir: str, every_rank_loads: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from modeling import _load_weights
    from infra.parallel import init_distributed, load_device, shard_model

    rank, _, device = init_distributed()
    before = peak_rss_mib()
    where = torch.device("cpu") if every_rank_loads else load_device(True, device)
    model = _load_weights(AutoModelForCausalLM, model_dir, "float32", where, "none", False)
    shard_model(model, device, torch.float32)
    shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"rank {rank}: loaded on {where.type}; peak RSS {peak_rss_mib():,.0f} MiB (before loading {before:,.0f}); "
          f"its fp32 shards {shards:,.0f} MiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--every_rank_loads", action="store_true", help="load the whole model on every rank's CPU")
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the Llama")
    p.add_argument("--rank_of", default="", help=argparse.SUPPRESS)  # internal: the model folder, on each rank
    opts = p.parse_args()
    if opts.rank_of:
        from infra.parallel import destroy_distributed

        rank_main(opts.rank_of, opts.every_rank_loads)
        destroy_distributed()  # after rank_main returned: its sharded model would hold the group (utils)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="fsdp_load_") as tmp:
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                             num_hidden_layers=opts.layers, num_attention_heads=16, num_key_value_heads=16,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        print(f"model: {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters, "
              f"{sum(t.numel() for t in model.parameters()) * 4 / 2**20:,.0f} MiB in fp32")
        model.save_pretrained(tmp)
        del model
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--rank_of", tmp] + (["--every_rank_loads"] if opts.every_rank_loads else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
        print("\n".join(sorted(lines)) if lines and not done.returncode else done.stdout[-3000:])
        if done.returncode:
            raise SystemExit(f"the ranks failed (exit status {done.returncode})")


if __name__ == "__main__":
    main()
