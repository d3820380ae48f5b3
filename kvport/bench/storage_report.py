"""The report of `kvport bench storage` for networked tiers (a text table) and its PNG for every backend.
Owns formatting and plotting only; imports matplotlib inside ``plot``."""

from __future__ import annotations

import os


def format_remote_report(r: dict) -> str:
    mib = r["chunk_bytes"] / (1 << 20)
    lines = [
        f"storage: {r['backend']}  {r['chunks']} chunks x {mib:g} MiB x {r['rounds']} rounds, batches of {r['batch']}, "
        f"{r['concurrency']} calls in flight" + (", every byte verified" if r["verify"] else ""),
        f"tier: {r['tier']}",
        f"machine: {r['machine']}",
        f"{'':6} {'MB/s':>8} {'chunks/s':>9} {'calls/s':>8} {'call p50':>9} {'call p99':>9} {'chunk p50':>9} "
        f"{'chunk p99':>9}  vs raw",
    ]
    for name, label in (("raw", "store"), ("store", "store"), ("raw", "load"), ("load", "load")):
        row = r["raw"][label] if name == "raw" else r[label]
        tag = f"raw {label}" if name == "raw" else label
        ratio = "" if name == "raw" else f"  {row['ratio_to_raw']:.2f}"
        lines.append(
            f"{tag:10} {row['mbps']:8.1f} {row['chunks_per_s']:9.1f} {row['ops_per_s']:8.1f} "
            f"{row['op_p50_ms']:7.2f}ms {row['op_p99_ms']:7.2f}ms {row['chunk_p50_ms']:7.2f}ms "
            f"{row['chunk_p99_ms']:7.2f}ms{ratio}"
        )
    lk = r["lookup"]
    lines.append(
        f"lookup of {lk['batch']} chunks ({lk['found_fraction']:.0%} found)  "
        f"hit p50 {lk['hit_p50_us']:.0f} us  p99 {lk['hit_p99_us']:.0f} us   "
        f"miss p50 {lk['miss_p50_us']:.0f} us  p99 {lk['miss_p99_us']:.0f} us   raw p50 {lk['raw_hit_p50_us']:.0f} us"
    )
    verified = "" if r["verified_mismatches"] is None else f", {r['verified_mismatches']} chunks differed"
    lines.append(f"hit rate {r['hit_rate']:.1%} (raw client: {r['raw']['client']}){verified}")
    t = r["targets"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines.append(
        f"targets: store >= {t['ratio_to_raw']:.0%} of raw {verdict(t['store_met'])}, load {verdict(t['load_met'])}"
    )
    return "\n".join(lines)


def plot(r: dict, path) -> None:
    """Throughput of kvport and the raw client, and per-chunk latency, as one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["store", "load"]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [r["raw"][n]["mbps"] for n in names], 0.4, label=f"raw ({r['raw']['client']})")
    left.bar([i + 0.2 for i in x], [r[n]["mbps"] for n in names], 0.4, label="kvport tier")
    left.set_xticks(list(x), names)
    left.set_ylabel("MB/s")
    left.legend(fontsize=7)
    left.set_title(f"{r['backend']}: {r['chunk_bytes'] / 2**20:g} MiB chunks", fontsize=9)
    bars = [("raw", "p50"), ("kvport", "p50"), ("raw", "p99"), ("kvport", "p99")]
    for slot, (who, label) in enumerate(bars):  # four bars side by side per operation
        values = [(r["raw"][n] if who == "raw" else r[n])[f"chunk_{label}_ms"] for n in names]
        right.bar([i - 0.3 + slot * 0.2 for i in x], values, 0.2, label=f"{who} {label}")
    right.set_xticks(list(x), names)
    right.set_ylabel("ms per chunk")
    right.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_disk(result: dict, path) -> None:
    shaped = {
        "backend": result["backend"],
        "chunk_bytes": result["chunk_bytes"],
        "raw": {"client": "sequential file I/O"},
    }
    for name, raw_key in (("store", "write"), ("load", "read")):
        shaped[name] = {
            "mbps": result[name]["gbps"] * 1e3,
            "chunk_p50_ms": result[name]["p50_ms"],
            "chunk_p99_ms": result[name]["p99_ms"],
        }
        shaped["raw"][name] = {
            "mbps": result["raw"][f"{raw_key}_gbps"] * 1e3,
            "chunk_p50_ms": result["raw"][f"{raw_key}_p50_ms"],
            "chunk_p99_ms": result["raw"][f"{raw_key}_p99_ms"],
        }
    plot(shaped, path)
