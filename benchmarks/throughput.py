"""Training and forward throughput of the aligner beside the frozen model and peft's LoRA and AdaptionPrompt,
measured side by side in one run; peak memory of training and of a forward, and bytes per aligner.

    python -m benchmarks.throughput --device cpu --shape smollm2 --batch 2 --seq 64
    python -m benchmarks.throughput --device cuda --shape llama2-7b

The aligner runs on the raw transformers model (through its attention interface, SDPA: what training and
generation run) and on the TransformerBridge, whose attention is TransformerLens's own re-implementation (eager:
the (T, T) pattern is formed for its hook points); peft runs on the raw model, and its LoRA layer also inside the
bridge (the suite's `aligner.methods.LoRA`). So each table gives two floors, the raw model's and the bridge's; a
method's own cost is its ratio to the floor of the model it runs on. The raw model's forwards keep no KV cache,
as in training.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from peft import AdaptionPromptConfig, LoraConfig, get_peft_model

from benchmarks.common import (
    Variant,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    input_gradients,
    json_option,
    no_grad,
    peak_gib,
    prefix_kept,
    random_aligner,
    random_bridge_lora,
    rate,
    ratio,
    ratio_interval,
    run_interleaved,
    sharing_copy,
    table,
    train_step,
    write_json,
)
from benchmarks.report import ratio_text

START_LAYER = 2  # the aligner's default, and AdaptionPrompt's adapted layers are the same top ones
TABLES = ("training", "forward")  # what --tables may name, in the order they are measured


def main() -> None:
    parser = json_option(arguments(__doc__))
    parser.add_argument("--n-tokens", default="1,10", help="the aligner sizes N to measure")
    parser.add_argument(
        "--tables", default="training,forward", help="which tables to measure (a forward alone takes more rounds)"
    )
    args = finish(parser.parse_args())
    tables = args.tables.split(",")
    if set(tables) - set(TABLES):
        raise SystemExit(f"--tables: a comma-separated list of {' and '.join(TABLES)}, got {args.tables!r}")
    n_tokens = [int(n) for n in args.n_tokens.split(",")]
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    n_layers = hf.config.num_hidden_layers
    lora = get_peft_model(sharing_copy(hf), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    adaption = get_peft_model(
        sharing_copy(hf),
        AdaptionPromptConfig(adapter_len=10, adapter_layers=n_layers - START_LAYER, task_type="CAUSAL_LM"),
    )
    aligners = {n: random_aligner(bridge, n) for n in n_tokens}
    # peft's LoRA layer inside the bridge: the same floor as the aligner's, so the two compare as methods.
    bridge_lora = random_bridge_lora(bridge)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    n = args.batch * args.seq

    def hf_logits(model):
        return lambda: model(input_ids=ids, use_cache=False).logits

    def bridge_logits():
        return bridge(ids)

    def trainable(model):
        return [p for p in model.parameters() if p.requires_grad]

    training = [
        Variant("raw HF, frozen, input gradients", train_step(hf_logits(hf), ids, []), lambda: input_gradients(hf), n),
        Variant(
            "bridge, frozen, input gradients", train_step(bridge_logits, ids, []), lambda: input_gradients(bridge), n
        ),
        *(
            Variant(
                f"raw HF + aligner N={k}",
                train_step(hf_logits(hf), ids, list(al.parameters())),
                lambda al=al: al.attached(hf),
                n,
            )
            for k, al in aligners.items()
        ),
        *(
            Variant(
                f"bridge + aligner N={k}",
                train_step(bridge_logits, ids, list(al.parameters())),
                lambda al=al: al.attached(bridge),
                n,
            )
            for k, al in aligners.items()
        ),
        Variant(
            "bridge + peft LoRA r=8 q,v",
            train_step(bridge_logits, ids, list(bridge_lora.parameters())),
            lambda: bridge_lora.attached(bridge),
            n,
        ),
        Variant("raw HF + peft LoRA r=8 q,v", train_step(hf_logits(lora), ids, trainable(lora)), tokens=n),
        Variant(
            "raw HF + peft AdaptionPrompt len 10", train_step(hf_logits(adaption), ids, trainable(adaption)), tokens=n
        ),
    ]

    @contextlib.contextmanager
    def merged(al):
        al.merge_into(bridge)
        try:
            yield
        finally:
            al.unmerge()

    forward = [
        Variant("raw HF", no_grad(hf_logits(hf)), tokens=n),
        Variant("bridge", no_grad(bridge_logits), tokens=n),
        *(
            Variant(f"raw HF + aligner N={k}, attached", no_grad(hf_logits(hf)), lambda al=al: al.attached(hf), n)
            for k, al in aligners.items()
        ),
        *(
            Variant(f"bridge + aligner N={k}, attached", no_grad(bridge_logits), lambda al=al: al.attached(bridge), n)
            for k, al in aligners.items()
        ),
        # Serving many batches: K_p, V_p computed at a round's first forward and kept for its others.
        *(
            Variant(
                f"bridge + aligner N={k}, attached, prefix kept (fixed_prefix)",
                no_grad(bridge_logits),
                lambda al=al: prefix_kept(al, bridge),
                n,
            )
            for k, al in aligners.items()
        ),
        *(
            Variant(
                f"bridge + aligner N={k}, merged into the biases", no_grad(bridge_logits), lambda al=al: merged(al), n
            )
            for k, al in aligners.items()
            if k == 1
        ),
        Variant("bridge + peft LoRA r=8 q,v", no_grad(bridge_logits), lambda: bridge_lora.attached(bridge), n),
        Variant("raw HF + peft LoRA r=8 q,v", no_grad(hf_logits(lora)), tokens=n),
        Variant("raw HF + peft AdaptionPrompt len 10", no_grad(hf_logits(adaption)), tokens=n),
    ]

    print(header(args))
    titled = {
        "training": ("Training (forward + backward + optimizer step)", training),
        "forward": ("Forward (no gradients)", forward),
    }
    data: dict[str, list[dict]] = {}
    for name in (name for name in TABLES if name in tables):
        title, variants = titled[name]
        run_interleaved(variants, args.rounds, args.iters, args.device)
        raw, bridged = variants[0], variants[1]
        data[name] = [
            {
                "variant": v.name, "tokens_per_s": rate(v),
                "vs_raw": ratio(v, raw), "vs_raw_interval": ratio_interval(v, raw),
                "vs_bridge": ratio(v, bridged), "vs_bridge_interval": ratio_interval(v, bridged),
            }
            for v in variants
        ]  # fmt: skip
        rows = [
            [row["variant"], f"{row['tokens_per_s']:,.0f}", *(ratio_text(row, f) for f in ("vs_raw", "vs_bridge"))]
            for row in data[name]
        ]
        print(f"\n{title}, tokens/s and ratios to the two floors:\n")
        print(table(rows, ["variant", "tokens/s", "/ raw HF", "/ bridge"]))

    print("\nSize:\n")
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, al in aligners.items():
            saved = al.save(Path(tmp) / f"n{k}")
            sizes.append(
                {
                    "variant": f"aligner N={k}",
                    "parameters": al.num_parameters(),
                    "bytes_in_memory": sum(p.numel() * p.element_size() for p in al.parameters()),
                    "bytes_on_disk": sum(f.stat().st_size for f in saved.iterdir()),  # safetensors + json
                }
            )
    for name, model in (("peft LoRA r=8 q,v", lora), ("peft AdaptionPrompt len 10", adaption)):
        params = trainable(model)
        sizes.append(
            {
                "variant": name,
                "parameters": sum(p.numel() for p in params),
                "bytes_in_memory": sum(p.numel() * p.element_size() for p in params),
            }
        )
    data["size"] = sizes
    rows = [
        [
            r["variant"],
            f"{r['parameters']:,}",
            f"{r['bytes_in_memory']:,}",
            f"{r['bytes_on_disk']:,} (safetensors + json)" if "bytes_on_disk" in r else "",
        ]
        for r in sizes
    ]
    print(table(rows, ["adapter", "parameters", "bytes in memory", "bytes on disk"]))

    if args.device == "cuda":  # torch keeps no peak of the CPU's allocations
        for name in (name for name in TABLES if name in tables):
            title, variants = titled[name]
            data[f"peak_gib_{name}"] = [{"variant": v.name, "peak_gib": peak_gib(v)} for v in variants]
            print(f"\nPeak GPU memory of one call, {name} (weights included):\n")
            rows = [[r["variant"], f"{r['peak_gib']:.2f}"] for r in data[f"peak_gib_{name}"]]
            print(table(rows, ["variant", "peak GiB"]))
    write_json(args, "throughput", data)


if __name__ == "__main__":
    main()
