"""What a run's record says: the issue's goals, and one table for the terminal."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def goals(result: dict) -> dict:
    """The targets at 1024 px: schnell + refiner <= 0.5 s per image at the batch that
    maximises throughput (the fastest eager/compiled refiner at that batch), refiner <= 15 ms."""
    parts = result["parts"]
    size = result["scale"]["big_size"]
    sweep = [r for r in parts["latency"].get("rows", []) if r["status"] == "ok" and r["size"] == size]
    refiner = [r for r in parts["refiner_speed"].get("rows", []) if r["status"] == "ok"]
    out: dict[str, Any] = {}
    if refiner:
        best = min(refiner, key=lambda r: r["ms_per_image"])
        out["refiner_ms_per_image"] = {"best": best["ms_per_image"], "at": best, "goal": 15.0}
    if sweep:
        fastest = min(sweep, key=lambda r: r["s_per_image"])
        same_batch = [r["ms_per_image"] for r in refiner if r["batch"] == fastest["batch"]]
        refine_s = min(same_batch, default=0.0) / 1000
        out["schnell_plus_refiner_s_per_image"] = {
            "best": round(fastest["s_per_image"] + refine_s, 4),
            "batch": fastest["batch"],
            "refiner_included": bool(same_batch),
            "goal": 0.5,
        }
    return out


def cell(row: dict, figure: str) -> str:
    return figure if row.get("status") == "ok" else row.get("reason") or row.get("error") or row["status"]


def table(result: dict) -> Table:
    parts = result["parts"]
    table = Table(title=f"{result['device']}, {result['dtype']}: FLUX.1 at full size, random weights")
    for column in ("part", "setting", "result"):
        table.add_column(column)
    for name, part in parts.items():
        if part["status"] != "ok":
            table.add_row(name, "", cell(part, ""))
    for r in parts["latency"].get("rows", []):
        figure = f"{r.get('s_per_image')} s/image, {r.get('peak_vram_gib')} GiB"
        table.add_row("schnell", f"{r['size']}px batch {r['batch']}", cell(r, figure))
    refiner = parts["refiner_speed"].get("rows", [])
    for batch in sorted({r["batch"] for r in refiner}):
        figures = [f"{r['variant']} {cell(r, str(r.get('ms_per_image')))}" for r in refiner if r["batch"] == batch]
        table.add_row("refiner", f"{refiner[0]['size']}px batch {batch}", "; ".join(figures) + " ms/image")
    apart = parts["batching"]
    if apart["status"] == "ok":
        for name in ("generator", "generator_and_refiner"):
            levels = apart[name]
            table.add_row(
                "batch vs alone",
                f"{name}, {apart['size']}px batch {apart['batch']}",
                f"max {levels['max_levels']}, mean {levels['mean_levels']} levels of 255",
            )
    saved = parts["saving"]
    for run in saved.get("rows", []):
        if run["status"] != "ok":
            table.add_row("dev vs schnell+refiner", f"batch {run['batch']}", cell(run, ""))
            continue
        dev, both = run["dev"], run["schnell_plus_refiner"]
        table.add_row(
            "dev vs schnell+refiner",
            f"{saved.get('size')}px batch {run['batch']}",
            f"{cell(dev, str(dev.get('s_per_image')))} vs {cell(both, str(both.get('s_per_image')))} s/image: "
            f"{run.get('saving_vs_dev', '-')} saved (FLOPs: {saved.get('flops_saving_vs_dev')})",
        )
    system = parts["system"]
    if system["status"] == "ok":
        table.add_row(
            "system/direct", f"{system['size']}px, max_batch {system['max_batch']}", str(system["system_over_direct"])
        )
    for name, goal in result.get("goals", {}).items():
        table.add_row("goal", name, f"{goal['best']} (goal {goal['goal']})")
    table.caption = f"{result['elapsed_s']} s of {result['budget_s']:.0f} s"
    return table
