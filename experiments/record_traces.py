"""Train the small NNX MoE transformer on the synthetic language and record its routing traces.

    python experiments/record_traces.py [--quick] [--experts 16] [--steps 800] [--force]

Writes experiments/results/traces/<name>_layer<i>.json (formats.md 3.1, batch_size 1, one file
per MoE layer) and <name>_model.json (config, steps, losses). Skips a model whose files exist,
unless --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np

from pipesched._common import write_json
from pipesched.moe import Language, TransformerConfig, held_out_tokens, routing_traces, train_trace_model

RESULTS = Path(__file__).resolve().parent / "results" / "traces"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps, 16 held-out sequences (seconds)")
    parser.add_argument("--experts", type=int, default=16, help="experts per MoE layer (8-16)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--time-limit", type=float, default=900.0,
                        help="seconds of training at most (a safety net: traces repeat only when all steps run)")
    parser.add_argument("--devices", type=int, default=4, help="G of the recorded instances")
    parser.add_argument("--held-out", type=int, default=128, help="held-out sequences of 32 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="default nnx_e<experts>_k<top-k>[_quick]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--force", action="store_true", help="retrain even if the files exist")
    args = parser.parse_args(argv)

    name = args.name or f"nnx_e{args.experts}_k{args.top_k}" + ("_quick" if args.quick else "")
    summary_path = args.out / f"{name}_model.json"
    if summary_path.exists() and not args.force:
        print(f"{summary_path} exists: skipping (use --force to retrain)")
        return sorted(args.out.glob(f"{name}_layer*.json"))
    steps, held_out = (100, 16) if args.quick else (args.steps, args.held_out)

    language = Language(seed=args.seed)
    config = TransformerConfig(vocab_size=language.vocab_size, num_experts=args.experts, top_k=args.top_k,
                               num_layers=args.layers)
    trained = train_trace_model(config, language, steps=steps, time_limit=args.time_limit, seed=args.seed)
    tokens = held_out_tokens(trained, held_out)
    slots = math.ceil(args.experts / args.devices)
    instances = routing_traces(trained.model, tokens, num_devices=args.devices, slots_per_device=slots, name=name)

    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, instance in enumerate(instances):
        paths.append(args.out / f"{name}_layer{i}.json")
        instance.save(paths[-1])
    summary = {"name": name, "config": dataclasses.asdict(config), "language": dataclasses.asdict(language),
               "steps": trained.steps, "train_seconds": trained.seconds,
               "first_loss": trained.losses[0], "final_loss": float(np.median(trained.losses[-20:])),
               "held_out_tokens": int(tokens.size), "layers": [p.name for p in paths],
               "expert_share": [(inst.batch_counts.sum(axis=0) / inst.batch_counts.sum()).round(4).tolist()
                                for inst in instances]}
    write_json(summary, summary_path)  # last, atomically: it marks the model's files complete
    print(f"trained {trained.steps} steps in {trained.seconds:.0f} s, loss {summary['first_loss']:.3f} -> "
          f"{summary['final_loss']:.3f}; wrote {len(paths)} traces to {args.out}")
    return paths


if __name__ == "__main__":
    main()
