"""What `refinery eval` leaves behind for people: `report.md`, `spectrum.png`, `samples.png`.

Plots are drawn with PIL, so evaluation needs no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from refiner.pixels import to_pil

COLOURS = {"student": (214, 39, 40), "refined": (31, 119, 180), "teacher": (44, 160, 44)}


def plot_spectra(path: Path, frequencies: np.ndarray, spectra: dict[str, np.ndarray], cutoff: float) -> None:
    """Log power against frequency, one line per image set, the high-frequency cutoff dashed."""
    width, height, left, right, top, bottom = 680, 420, 64, 20, 34, 48
    logs = {name: np.log10(np.maximum(values, 1e-20)) for name, values in spectra.items()}
    low = math.floor(min(v.min() for v in logs.values()))
    high = max(math.ceil(max(v.max() for v in logs.values())), low + 1)

    def x_of(frequency: float) -> float:
        return left + frequency / 0.5 * (width - left - right)  # Nyquist at the right edge

    def y_of(log_power: float) -> float:
        return top + (high - log_power) / (high - low) * (height - top - bottom)

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    step = max(1, (high - low) // 8)  # at most ~8 labelled decades
    for decade in range(low, high + 1, step):
        y = y_of(decade)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((6, y - 6), f"1e{decade}", fill="black")
    for tick in np.arange(0, 0.51, 0.1):
        x = x_of(tick)
        draw.line([(x, top), (x, height - bottom)], fill=(225, 225, 225))
        draw.text((x - 8, height - bottom + 6), f"{tick:.1f}", fill="black")
    for y in range(top, height - bottom, 8):  # dashed: where "high frequency" starts
        draw.line([(x_of(cutoff), y), (x_of(cutoff), y + 4)], fill=(120, 120, 120))
    draw.text((x_of(cutoff) + 4, top + 4), "HF cutoff", fill=(120, 120, 120))
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for index, (name, values) in enumerate(logs.items()):
        # The first line drawn widest, so a later one lying on it (identity refiner) leaves it visible.
        draw.line(
            [(x_of(f), y_of(v)) for f, v in zip(frequencies, values)],
            fill=COLOURS.get(name, "black"),
            width=5 if index == 0 else 2,
        )
    for row, name in enumerate(logs):  # legend, top right
        y = top + 8 + 14 * row
        draw.line([(width - right - 110, y + 6), (width - right - 88, y + 6)], fill=COLOURS.get(name, "black"), width=3)
        draw.text((width - right - 82, y), name, fill="black")
    draw.text((left, 10), "radially averaged power spectrum of the grayscale image (log10 power)", fill="black")
    draw.text((left + 150, height - 20), "spatial frequency (cycles / pixel)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def sample_grid(
    path: Path,
    samples: Sequence[tuple[Any, ...]],
    labels: Sequence[Sequence[str]] | None = None,
    title: list[str] | None = None,
    columns: tuple[str, ...] = ("student", "refined", "teacher"),
) -> None:
    """One pair per row, `(row label, one (3, H, W) image per column)`, the label on the left;
    small images are enlarged (nearest neighbour) to at least 128 px so texture stays
    visible. `labels`: a line over each image of each row; `title`: lines over the grid."""
    line = 14
    header, caption = 16 + line * len(title or ()), 110
    rows = []
    for pair_id, *images in samples:
        strip = to_pil(torch.cat(images, dim=-1))  # one image per column, side by side
        scale = max(1, math.ceil(128 / strip.height))
        rows.append((pair_id, strip.resize((strip.width * scale, strip.height * scale), Image.Resampling.NEAREST)))
    above = line if labels else 0  # room for each row's labels
    size = (caption + max(row.width for _, row in rows), header + sum(above + row.height for _, row in rows))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for index, text in enumerate(title or ()):
        draw.text((4, 2 + index * line), text, fill="black")
    column = rows[0][1].width // len(columns)
    for index, name in enumerate(columns):
        draw.text((caption + index * column + 4, header - 14), name, fill="black")
    y = header
    for index, (pair_id, row) in enumerate(rows):
        for column_index, label in enumerate(labels[index] if labels else ()):
            draw.text((caption + column_index * column + 4, y + 1), label, fill="black")
        canvas.paste(row, (caption, y + above))
        draw.text((4, y + above + 4), pair_id if len(pair_id) <= 16 else pair_id[:15] + "…", fill="black")
        y += above + row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def fmt(value: float | None, spec: str = ".4f") -> str:
    """`value` formatted, or `"n/a"` for a score that could not be computed."""
    return "n/a" if value is None else format(value, spec)


def fmt_interval(interval: list[float] | None, spec: str = ".4f") -> str:
    """` [lo, hi]` for a bootstrap interval, or `""` when none was computed."""
    return "" if interval is None else f" [{format(interval[0], spec)}, {format(interval[1], spec)}]"


def write_report(path: Path, metrics: dict[str, Any], context: dict[str, Any]) -> None:
    """The markdown report: `metrics` as in metrics.json, `context` the facts around them
    (data, device, affine source, extractor calibration, KID spread, cutoff)."""
    p, fid, kid, detail, cost = metrics["paired"], metrics["fid"], metrics["kid"], metrics["detail"], metrics["cost"]
    boot = metrics["bootstrap"]
    interval_note = f" [{boot['confidence']:.0%} interval]" if boot["resamples"] else ""
    bootstrap_lines = (
        [
            f"Intervals in brackets: {boot['confidence']:.0%} bootstrap intervals from {boot['resamples']} resamples "
            f"(seed {boot['seed']}): {boot['method']}. The features are the ones extracted once; only the",
            "choice of pairs varies. The shift is needed because FID grows as distinct images get fewer, and a",
            "resample holds about 63% of them. Two FIDs whose intervals do not overlap differ beyond the noise of",
            "which pairs were drawn (not beyond the noise of generating new ones).",
            "",
        ]
        if boot["resamples"]
        else []
    )
    lines = [
        "# Refiner evaluation",
        "",
        f"- data: `{context['data']}`, split `{metrics['split']}`, {metrics['pairs']} pairs",
        f"- refiner: `{metrics['refiner_version']}`, run on `{context['device']}`",
        f"- feature extractor: `{fid['extractor']}`; its FIDs compare with {fid['comparable_with']}",
        f"- affine baseline: {context['affine_source']}",
        "",
    ]
    if not context["calibrated"]:
        lines += [
            "> **Warning: uncalibrated FID/KID.** No InceptionV3 weights file was given, so the features come",
            "> from a fixed-seed random conv net. These values rank refiners on this dataset; they are",
            "> **not** comparable with published FIDs, nor with FIDs from any other extractor. Pass",
            "> `--inception-weights pt_inception-2015-12-05-*.pth` for the standard FID.",
            "",
        ]
    lines += [
        "## Scores against the teacher",
        "",
        "| score | student | refined | affine baseline |",
        "| --- | ---: | ---: | ---: |",
        f"| L1 (lower is better) | {fmt(p['student']['l1'], '.5f')} | {fmt(p['refined']['l1'], '.5f')} "
        f"| {fmt(p['affine']['l1'], '.5f')} |",
        f"| PSNR dB | {fmt(p['student']['psnr'], '.2f')} | {fmt(p['refined']['psnr'], '.2f')} | |",
        f"| SSIM | {fmt(p['student']['ssim'])} | {fmt(p['refined']['ssim'])} | |",
        f"| FID{interval_note} | {fmt(fid['student_teacher'], '.3f')}{fmt_interval(fid['student_teacher_ci'], '.3f')} "
        f"| {fmt(fid['refined_teacher'], '.3f')}{fmt_interval(fid['refined_teacher_ci'], '.3f')} | |",
        f"| KID (± std over subsets){interval_note} | {fmt(kid['student_teacher'], '.5f')} "
        f"± {fmt(context['kid_std']['student'], '.5f')}{fmt_interval(kid['student_teacher_ci'], '.5f')} "
        f"| {fmt(kid['refined_teacher'], '.5f')} ± {fmt(context['kid_std']['refined'], '.5f')}"
        f"{fmt_interval(kid['refined_teacher_ci'], '.5f')} | |",
        f"| HF energy / teacher's (1 is the teacher's detail) | {fmt(detail['student_hf_ratio'], '.3f')} "
        f"| {fmt(detail['refined_hf_ratio'], '.3f')} | |",
        "",
        f"**FIDdiff = {fmt(fid['fiddiff'], '.3f')}{fmt_interval(fid['fiddiff_ci'], '.3f')}, "
        f"gap closed = {fmt(fid['gap_closed'], '.1%')}.**",
        "",
        *bootstrap_lines,
        "Definitions (the paper names an FID-based difference score without publishing its formula):",
        "FIDdiff = FID(student, teacher) - FID(refined, teacher), positive when the refiner moves the",
        "student's images towards the teacher's distribution; gap closed = 1 - FID(refined, teacher) /",
        "FID(student, teacher): 100% is indistinguishable from the teacher, 0% no better than the student,",
        "negative worse. FID and KID are biased by the number of images: compare runs on the same pairs",
        "with the same extractor only. L1, PSNR and SSIM are means over pairs, each image against its own",
        "teacher image (refined images rounded to 8 bits, as served; PSNR capped at 100 dB). The affine",
        "baseline is the best global per-channel colour correction `a * x + b`: a refiner must beat it.",
        "",
        "## Detail",
        "",
        "![power spectra](spectrum.png)",
        "",
        f"The high-frequency energy is the share of the grayscale image's variance above {context['cutoff']}",
        "cycles/pixel (the upper half of the radial band up to Nyquist, after removing the mean and applying",
        "a Hann window), summed over pairs and divided by the teacher's. Distilled models lose fine detail,",
        "so the student's ratio is typically below 1; a good refiner brings it back towards 1 (above 1 is",
        "added noise or oversharpening).",
        "",
        "## Fairness",
        "",
        "Paired and detail scores per prompt attribute value. Improvement = 1 - refined L1 / student L1;",
        "a negative one (marked **worse**) means the refiner harms that group.",
        "",
    ]
    for attribute, groups in metrics["fairness"].items():
        lines += [
            f"### {attribute}",
            "",
            "| value | pairs | student L1 | refined L1 | improvement | student PSNR | refined PSNR "
            "| student HF | refined HF |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for value, g in groups.items():
            worse = " **worse**" if g["improvement"] is not None and g["improvement"] < 0 else ""
            lines.append(
                f"| {value} | {g['count']} | {fmt(g['student_l1'], '.5f')} | {fmt(g['refined_l1'], '.5f')} "
                f"| {fmt(g['improvement'], '.1%')}{worse} | {fmt(g['student_psnr'], '.2f')} "
                f"| {fmt(g['refined_psnr'], '.2f')} "
                f"| {fmt(g['student_hf_ratio'], '.3f')} | {fmt(g['refined_hf_ratio'], '.3f')} |"
            )
        lines.append("")
    lines += [
        "## Cost per image",
        "",
        "| stage | ms per image | measured |",
        "| --- | ---: | --- |",
        f"| student generation | {fmt(cost['student_ms'], '.2f')} | manifest `timings_ms`, on the generating worker |",
        f"| teacher generation | {fmt(cost['teacher_ms'], '.2f')} | manifest `timings_ms`, on the generating worker |",
        f"| refiner | {fmt(cost['refiner_ms'], '.2f')} "
        f"| here, on `{context['device']}`, batch of {context['batch_size']} |",
        "",
        f"Cost reduction of student + refiner against the teacher: **{fmt(cost['reduction'], '.1%')}**"
        " (1 - (student + refiner) / teacher). Generation and refinement were timed on different machines",
        "unless the pairs were generated on this device; compare like with like.",
        "",
        "## Samples",
        "",
        "![student | refined | teacher](samples.png)",
        "",
    ]
    path.write_text("\n".join(lines))
