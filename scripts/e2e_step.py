"""End-to-end training step, reference vs the fast model, interleaved in one process (GPU or CPU).

    python scripts/e2e_step.py [--model mae_vit_base_patch16] [--batch-size 256] [--steps 20] [--json PATH]

Times forward + backward + AdamW step with CUDA events after a warm-up, bf16 autocast on CUDA. The
fast model runs forward_train (decoder head on removed tokens only). Same weights, same images.
"""
import argparse
import sys

import torch

from mae_fast import benchutil, models, reference


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mae_vit_base_patch16")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ref = reference.create_model(args.model, norm_pix_loss=True).to(dev)
    fast = models.create_model(args.model, norm_pix_loss=True).to(dev)
    fast.load_state_dict(ref.state_dict())
    C, (H, W) = ref.patch_embed.in_chans, ref.patch_embed.img_size
    imgs = [torch.randn(args.batch_size, C, H, W, device=dev) for _ in range(3)]
    variants = {
        "reference": (ref, lambda m, x: m(x, args.mask_ratio)[0]),
        "mae_fast": (fast, lambda m, x: m.forward_train(x, args.mask_ratio)),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
            for k, (m, _) in variants.items()}
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    times = {k: [] for k in variants}
    peak = {}
    for it in range(5 + args.steps):  # 5 warm-up steps, then interleaved timed steps
        for k, (m, fn) in variants.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if dev.type == "cuda" else (None, None)
            if start:
                start.record()
            t0 = __import__("time").perf_counter()
            with amp:
                loss = fn(m, imgs[it % 3])
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if start:
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
                peak[k] = torch.cuda.max_memory_allocated()
            else:
                ms = (__import__("time").perf_counter() - t0) * 1e3
            if it >= 5:
                times[k].append(ms)
    rows = []
    for k, t in times.items():
        q = benchutil._quantiles(t)
        rows.append({"variant": k, "step_ms_median": q["median_ms"], "step_ms_p20": q["p20_ms"], "step_ms_p80": q["p80_ms"],
                     "images_per_s": args.batch_size / q["median_ms"] * 1e3, "peak_mem_GiB": peak.get(k, float("nan")) / 2**30})
    for r in rows:
        r["speedup_vs_reference"] = rows[0]["step_ms_median"] / r["step_ms_median"]
    doc = benchutil.provenance(["python", *sys.argv], dev)
    doc["config"] = vars(args)
    doc["results"] = rows
    if args.json:
        benchutil.write_json(args.json, doc)
    print(f"{args.model} batch {args.batch_size} ratio {args.mask_ratio} on {doc['device']}")
    print(benchutil.format_table(rows, ["variant", "images_per_s", "step_ms_median", "step_ms_p20", "step_ms_p80", "peak_mem_GiB", "speedup_vs_reference"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
