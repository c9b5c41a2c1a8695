"""The run report: `eval.json` and the training metrics of a run directory → one self-contained report.html.

    python -m instrugo.report runs/demo       (`instrugo run` writes it at the end of every run)

The page answers, in order: how does each policy score (headline tables, reward model, timings); how did
PPO move the proxy (RM) score, the gold score and the KL; where does optimising the proxy stop helping
the gold score (Gao et al.'s overoptimisation picture); win rates against SFT; which constraint kinds each
policy satisfies; and what the responses actually look like. It is static: inline CSS, plots as base64
PNGs drawn by matplotlib's Agg canvas, no scripts, no external resources. Model text is untrusted and
always escaped.

Whatever the run lacks (no PPO yet, a policy that was not evaluated) is shown as missing, not an error;
a file that exists but is malformed is an InputError naming the file, line and field.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from instrugo.config import option
from instrugo.judge.gold import BASE_WEIGHT, CONSTRAINT_WEIGHT, TOPIC_WEIGHT
from instrugo.runio import InputError, atomic_write_text, iter_jsonl, read_json

REPORT_FILE = "report.html"
SAMPLE_SPLIT = "eval"
SAMPLE_POLICIES = ("base", "sft", "ppo", "ppo_ptx")
# Fixed colours so a policy looks the same in every plot; best-of-n and anything else get the last two.
COLORS = {"base": "#9a9a9a", "sft": "#4e79a7", "ppo": "#e15759", "ppo_ptx": "#59a14f"}
BON_COLOR, OTHER_COLOR = "#f28e2b", "#b07aa1"
STYLE = {
    "figure.dpi": 100, "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e6e6e6",
    "axes.edgecolor": "#888888", "legend.frameon": False, "lines.linewidth": 1.6,
}
PNG_DPI = 110


@dataclass
class ReportConfig:
    """Write RUN_DIR/report.html from the run's eval.json, metrics and generations."""

    run_dir: str = option("runs/demo", "Run directory (as written by `instrugo run`).")
    samples: int = option(6, "Prompts of the eval split shown with each policy's response side by side.")


@dataclass
class RunData:
    """Everything the report shows, read from one run directory; missing parts are empty."""

    run_dir: Path
    eval: dict                          # eval.json
    ppo: dict[str, list[dict]]          # variant -> metric rows of all rounds, with "round" and "total_episodes"
    rm_final: dict[str, dict]           # "roundN" -> the final line of roundN/rm/metrics.jsonl
    rm_curve: dict[str, list[dict]]     # "roundN" -> RM training steps
    sft_curve: list[dict]               # SFT training steps
    samples: dict[str, list[dict]]      # policy -> its generations on the eval split


# ---------------------------------------------------------------------------------------------- reading


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value) -> bool:
    """A number that can be drawn or formatted (NaN marks an undefined rate in eval.json)."""
    return is_number(value) and math.isfinite(value)


def check_numbers(mapping: dict, path: Path, field: str, line: int | None = None) -> None:
    """Each value must be a number or null (NaN is a number: an undefined rate)."""
    for key, value in mapping.items():
        if value is not None and not is_number(value):
            raise InputError(path, f"expected a number, got {value!r}", line=line, field=f"{field}{key}")


def check_mapping(value, path: Path, field: str | None) -> dict:
    if not isinstance(value, dict):
        raise InputError(path, f"expected an object, got {type(value).__name__}", field=field)
    return value


def read_eval(path: Path) -> dict:
    """eval.json, with the types the report relies on checked; {} when the run has none yet."""
    if not path.exists():
        return {}
    try:
        data = read_json(path)
    except ValueError as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    check_mapping(data, path, None)
    for split, by_policy in check_mapping(data.get("splits", {}), path, "splits").items():
        for policy, summary in check_mapping(by_policy, path, f"splits.{split}").items():
            field = f"splits.{split}.{policy}"
            summary = check_mapping(summary, path, field)
            kinds = check_mapping(summary.get("pass_rate_by_kind", {}), path, f"{field}.pass_rate_by_kind")
            check_numbers(kinds, path, f"{field}.pass_rate_by_kind.")
            check_numbers({k: v for k, v in summary.items() if k != "pass_rate_by_kind"}, path, f"{field}.")
    for section in ("pretrain_loss", "seconds", "peak_rss_gib"):
        check_numbers(check_mapping(data.get(section, {}), path, section), path, f"{section}.")
    for section in ("reward_model", "policies", "labelers"):
        check_mapping(data.get(section, {}), path, section)
    return data


def read_rows(path: Path, numbers: tuple[str, ...], texts: tuple[str, ...] = (),
              required: tuple[str, ...] = ()) -> list[dict]:
    """A metrics/generations JSONL file: `required` keys present, `numbers` numeric, `texts` strings."""
    rows = []
    for line, row in iter_jsonl(path):
        for key in required:
            if key not in row:
                raise InputError(path, "missing", line=line, field=key)
        check_numbers({k: row[k] for k in numbers if k in row}, path, "", line=line)
        for key in texts:
            if key in row and not isinstance(row[key], str):
                raise InputError(path, f"expected text, got {row[key]!r}", line=line, field=key)
        rows.append(row)
    return rows


def round_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """roundN directories in numeric order (round10 after round9)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"round(\d+)", p.name))]
    return sorted(found)


PPO_NUMBERS = ("step", "episodes", "rm_score", "gold_score", "kl", "sqrt_kl")


def read_ppo_curves(run_dir: Path) -> dict[str, list[dict]]:
    """Every PPO variant's metrics, rounds concatenated on one axis of cumulative episodes.

    A variant is any directory of a round beside `rm/` that holds a metrics.jsonl (ppo, ppo_ptx, ...).
    """
    curves: dict[str, list[dict]] = {}
    for number, round_dir in round_dirs(run_dir):
        for variant_dir in sorted(p for p in round_dir.iterdir() if p.is_dir() and p.name != "rm"):
            path = variant_dir / "metrics.jsonl"
            if not path.exists():
                continue
            rows = curves.setdefault(variant_dir.name, [])
            offset = rows[-1]["total_episodes"] if rows else 0
            for row in read_rows(path, PPO_NUMBERS, required=("episodes",)):
                rows.append({**row, "round": number, "total_episodes": offset + row["episodes"]})
    return {variant: rows for variant, rows in curves.items() if rows}


def read_reward_models(run_dir: Path) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Per round: the RM's final summary line and its training steps."""
    finals, curves = {}, {}
    for number, round_dir in round_dirs(run_dir):
        path = round_dir / "rm" / "metrics.jsonl"
        if not path.exists():
            continue
        rows = read_rows(path, ("step", "loss", "train_accuracy", "heldout_accuracy_vs_labels",
                                "heldout_accuracy_vs_gold", "n_comparisons"))
        curves[f"round{number}"] = [r for r in rows if not r.get("final") and "loss" in r]
        finals.update({f"round{number}": r for r in rows if r.get("final")})
    return finals, curves


def read_samples(run_dir: Path) -> dict[str, list[dict]]:
    folder = run_dir / "generations" / SAMPLE_SPLIT
    samples = {}
    for policy in SAMPLE_POLICIES:
        path = folder / f"{policy}.jsonl"
        if path.exists():
            samples[policy] = read_rows(path, ("gold_score", "n_tokens"), texts=("prompt", "response"),
                                        required=("prompt", "response"))
    return samples


def read_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run directory not found")
    eval_json = read_eval(run_dir / "eval.json")
    rm_final, rm_curve = read_reward_models(run_dir)
    sft_metrics = run_dir / "sft" / "metrics.jsonl"
    data = RunData(run_dir=run_dir, eval=eval_json, ppo=read_ppo_curves(run_dir), rm_final=rm_final,
                   rm_curve=rm_curve,
                   sft_curve=read_rows(sft_metrics, ("step", "loss")) if sft_metrics.exists() else [],
                   samples=read_samples(run_dir))
    if not (data.eval or data.ppo or data.rm_final or data.sft_curve):
        raise InputError(run_dir, "nothing to report: no eval.json, sft/metrics.jsonl or roundN/ metrics here")
    return data


# ------------------------------------------------------------------------------------------- formatting


def fmt(value, spec: str) -> str:
    """A number in `spec` ('{:.3f}', '{:.1%}', ...); a dash for missing or undefined values."""
    return spec.format(value) if finite(value) else "–"


def fmt_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{seconds:.1f}s"


def policy_order(names) -> list[str]:
    """base, sft, ppo, ppo_ptx first (the paper's order), then best-of-n and anything else by name."""
    known = [n for n in COLORS if n in names]
    return known + sorted(n for n in names if n not in COLORS)


def policy_color(name: str) -> str:
    return COLORS.get(name) or (BON_COLOR if name.startswith("bon_") else OTHER_COLOR)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


# ----------------------------------------------------------------------------------------------- plots


def styled(draw):
    """Run a figure-drawing function under the report's style (matplotlib reads rcParams as artists are made)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def png_img(fig: Figure, alt: str) -> str:
    """The figure as an inline base64 PNG <img> (Agg canvas: no display, no global pyplot state)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: rendering never touches pyplot or a display
    fig.savefig(buffer, format="png", dpi=PNG_DPI)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def figure_block(fig: Figure, alt: str, explanation: str) -> str:
    return f'<figure>{png_img(fig, alt)}<figcaption>{explanation}</figcaption></figure>'


PPO_PANELS = (("rm_score", "proxy (RM) score"), ("gold_score", "gold score"), ("kl", "KL to SFT (nats / response)"))


@styled
def ppo_curves_figure(curves: dict[str, list[dict]]) -> Figure:
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, len(PPO_PANELS))
    # A later round starts where the previous round of the same variant ended on the cumulative axis.
    round_starts = sorted({before["total_episodes"] for rows in curves.values()
                           for before, after in zip(rows, rows[1:]) if after["round"] != before["round"]})
    for ax, (key, title) in zip(axes, PPO_PANELS):
        for variant in policy_order(curves):
            points = [(r["total_episodes"], r[key]) for r in curves[variant] if finite(r.get(key))]
            if points:
                ax.plot(*zip(*points), color=policy_color(variant), label=variant,
                        marker="." if len(points) < 40 else None)
        for start in round_starts:
            ax.axvline(start, color="#bbbbbb", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("episodes (all rounds)")
    axes[0].legend(loc="best")
    return fig


@styled
def overoptimisation_figure(curves: dict[str, list[dict]], eval_points: dict[str, dict]) -> Figure:
    """Proxy and gold score against sqrt(KL): PPO trajectories as lines, evaluated policies as labelled dots."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, title in ((axes[0], "rm_score", "proxy (RM) score"), (axes[1], "gold_score", "gold score")):
        for variant in policy_order(curves):
            points = [(r["sqrt_kl"], r[key]) for r in curves[variant]
                      if finite(r.get("sqrt_kl")) and finite(r.get(key))]
            if points:
                ax.plot(*zip(*points), color=policy_color(variant), alpha=0.7, marker=".",
                        label=f"{variant} (training)")
        for policy in policy_order(eval_points):
            point = eval_points[policy]
            if finite(point.get(key)):
                ax.scatter(point["sqrt_kl"], point[key], s=60, color=policy_color(policy), edgecolor="black",
                           zorder=3, label=f"{policy} (eval)")
                ax.annotate(policy, (point["sqrt_kl"], point[key]), xytext=(5, 5), textcoords="offset points",
                            fontsize=9)
        ax.set_title(title)
        ax.set_xlabel("√KL to SFT  (√nats)")
    # One legend for both panels; a policy may appear in only one (no RM score, or no gold score).
    entries = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=8)
    return fig


SPLIT_SHADES = (1.0, 0.45, 0.25)  # bar opacity per split: the policy's colour, then lighter tints


@styled
def win_rate_figure(win_rates: dict[str, dict[str, float]]) -> Figure:
    """Grouped bars: one group per policy (in its colour), one bar per split (lighter for later splits)."""
    policies = policy_order({p for by_policy in win_rates.values() for p in by_policy})
    splits = list(win_rates)
    fig = Figure(figsize=(min(11.0, 2.0 + 0.9 * len(policies) * len(splits)), 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(splits)
    for i, split in enumerate(splits):
        xs = [p + (i - (len(splits) - 1) / 2) * width for p in range(len(policies))]
        values = [win_rates[split].get(policy, math.nan) for policy in policies]
        shade = SPLIT_SHADES[i % len(SPLIT_SHADES)]
        bars = ax.bar(xs, values, width=width * 0.92, color=[policy_color(p) for p in policies], alpha=shade,
                      edgecolor=[policy_color(p) for p in policies])
        ax.bar_label(bars, labels=[f"{fmt(v, '{:.0%}')}\n{split}" if finite(v) else "" for v in values],
                     fontsize=7, padding=2)
    ax.axhline(0.5, color="#555555", linestyle="--", linewidth=1, label="tie with SFT")
    ax.legend(loc="upper left")
    ax.set_xticks(range(len(policies)), policies)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("win rate vs SFT")
    ax.grid(axis="x", visible=False)
    return fig


@styled
def pass_by_kind_figure(by_split: dict[str, dict[str, dict[str, float]]]) -> Figure:
    """Grouped horizontal bars: one group per constraint kind, one bar per policy; one panel per split."""
    kinds = sorted({k for by_policy in by_split.values() for rates in by_policy.values() for k in rates})
    policies = policy_order({p for by_policy in by_split.values() for p in by_policy})
    height = 0.8 / len(policies)
    fig = Figure(figsize=(11, 1.2 + len(kinds) * (0.075 * len(policies) + 0.12)), layout="constrained")
    axes = fig.subplots(1, len(by_split), sharey=True, squeeze=False)[0]
    for ax, (split, by_policy) in zip(axes, by_split.items()):
        for i, policy in enumerate(policies):
            if policy in by_policy:
                ys = [k + (i - (len(policies) - 1) / 2) * height for k in range(len(kinds))]
                ax.barh(ys, [by_policy[policy].get(kind, math.nan) for kind in kinds], height=height * 0.9,
                        color=policy_color(policy), label=policy)
        ax.set_xlim(0, 1)
        ax.set_xlabel("constraints of this kind satisfied")
        ax.set_title(split)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(range(len(kinds)), kinds)
    axes[0].invert_yaxis()  # once: the y axis is shared, so a second call would undo it
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(policies))
    return fig


@styled
def training_figure(sft_curve: list[dict], rm_curve: dict[str, list[dict]]) -> Figure:
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    sft_ax, rm_ax = fig.subplots(1, 2)
    points = [(r["step"], r["loss"]) for r in sft_curve if finite(r.get("step")) and finite(r.get("loss"))]
    if points:
        sft_ax.plot(*zip(*points), color=COLORS["sft"])
    sft_ax.set_title("SFT: response-token loss")
    sft_ax.set_xlabel("step")
    for name, rows in rm_curve.items():
        points = [(r["step"], r["loss"]) for r in rows if finite(r.get("step")) and finite(r.get("loss"))]
        if points:
            rm_ax.plot(*zip(*points), label=name)
    if rm_curve:
        rm_ax.axhline(math.log(2), color="#555555", linestyle="--", linewidth=1)
        rm_ax.text(rm_ax.get_xlim()[1], math.log(2), "chance (ln 2)", va="bottom", ha="right", fontsize=8,
                   color="#555555")
        rm_ax.legend(loc="best")
    rm_ax.set_title("reward model: K-way ranking loss")
    rm_ax.set_xlabel("step")
    return fig


# -------------------------------------------------------------------------------------------- sections


HEADLINE_COLUMNS = (  # (header, key of the split summary, format)
    ("n", "n", "{:.0f}"),
    ("pass rate", "constraint_pass_rate", "{:.1%}"),
    ("gold score", "gold_score", "{:.3f}"),
    ("constraints met", "constraint_fraction", "{:.3f}"),
    ("topicality", "topicality", "{:.3f}"),
    ("quality", "quality", "{:.3f}"),
    ("win vs SFT", "win_rate_vs_sft", "{:.1%}"),
    ("KL to SFT", "kl_to_sft", "{:.2f}"),
    ("RM score", "rm_score", "{:+.3f}"),
    ("length", "mean_length_tokens", "{:.1f}"),
    ("no EOS", "no_eos_rate", "{:.0%}"),
)


def headline_section(data: RunData) -> str:
    splits = data.eval.get("splits", {})
    pretrain = data.eval.get("pretrain_loss", {})
    parts = []
    for split, by_policy in splits.items():
        rows = [[f'<span class="swatch" style="background:{policy_color(p)}"></span>{html.escape(p)}']
                + [fmt(by_policy[p].get(key), spec) for _, key, spec in HEADLINE_COLUMNS]
                + [fmt(pretrain.get(p), "{:.3f}")] for p in policy_order(by_policy)]
        parts.append(f"<h3>{html.escape(split)}</h3>"
                     + table(["policy"] + [h for h, _, _ in HEADLINE_COLUMNS] + ["pretrain loss"], rows))
    if not parts:
        return section("headline", "Headline", missing("No evaluation results (eval.json has no splits yet)."))
    legend = ("<p class='note'><b>pass rate</b>: responses meeting every constraint of their prompt. "
              f"<b>gold score</b>: the noise-free gold judge, quality × ({CONSTRAINT_WEIGHT} × constraints met + "
              f"{TOPIC_WEIGHT} × topicality + {BASE_WEIGHT}), its terms in the next three columns: "
              "<b>constraints met</b> is the share of a prompt's "
              "constraints passed, <b>quality</b> falls for empty, gibberish or repetitive answers. "
              "<b>win vs SFT</b>: prompts where the gold judge prefers the policy to SFT (ties count half). "
              "<b>KL to SFT</b>: nats per response, exact over the vocabulary, on the policy's own responses "
              "(best-of-n: log n − (n−1)/n). <b>RM score</b>: the last reward model (the proxy). <b>length</b>: "
              "tokens. <b>pretrain loss</b>: held-out pretraining NLL, the alignment-tax probe (lower is better; "
              "PPO-ptx should stay near SFT).</p>")
    return section("headline", "Headline", "".join(parts) + legend + rm_and_timings(data))


def rm_and_timings(data: RunData) -> str:
    labelers = data.eval.get("labelers", {})
    finals = data.rm_final or ({"latest": data.eval["reward_model"]} if data.eval.get("reward_model") else {})
    rounds = sorted(set(finals) | set(labelers), key=lambda name: (len(name), name))
    rm_rows = [[html.escape(name),
                fmt(finals.get(name, {}).get("n_comparisons"), "{:.0f}"),
                fmt(finals.get(name, {}).get("heldout_accuracy_vs_labels"), "{:.1%}"),
                fmt(finals.get(name, {}).get("heldout_accuracy_vs_gold"), "{:.1%}"),
                fmt(labelers.get(name, {}).get("gold_agreement"), "{:.1%}"),
                fmt(labelers.get(name, {}).get("inter_annotator_agreement"), "{:.1%}")] for name in rounds]
    rm_part = (table(["round", "comparisons", "RM held-out acc. vs labels", "vs gold", "labels agree w/ gold",
                      "labelers agree"], rm_rows)
               + "<p class='note'>InstructGPT's RM: 69.6% on held-out labelers, people agree with each other "
                 "~73%. Accuracy vs gold near 50% means PPO is optimising noise.</p>"
               if rm_rows else missing("No reward model yet."))
    seconds = data.eval.get("seconds", {})
    peaks = data.eval.get("peak_rss_gib", {})  # recorded when stages run in their own processes
    time_rows = [[html.escape(stage), fmt_seconds(s)] + ([fmt(peaks.get(stage), "{:.1f} GiB")] if peaks else [])
                 for stage, s in seconds.items() if finite(s)]
    if time_rows:
        time_rows.append(["<b>total</b>", f"<b>{fmt_seconds(sum(s for s in seconds.values() if finite(s)))}</b>"]
                         + ([fmt(max((v for v in peaks.values() if finite(v)), default=None), "<b>{:.1f} GiB</b>")]
                            if peaks else []))
    time_part = (table(["stage", "time"] + (["peak RSS"] if peaks else []), time_rows) if time_rows
                 else missing("No stage timings recorded."))
    return (f'<div class="columns"><div><h3>Reward model and labels</h3>{rm_part}</div>'
            f'<div><h3>Stage timings</h3>{time_part}</div></div>')


def ppo_section(data: RunData) -> str:
    if not data.ppo:
        return section("ppo", "PPO training", missing("No PPO metrics (roundN/ppo*/metrics.jsonl) in this run."))
    several_rounds = len({r["round"] for rows in data.ppo.values() for r in rows}) > 1
    explanation = ("The proxy (RM) score should rise while KL grows; if the gold score stalls or falls as the proxy "
                   "keeps rising, PPO is exploiting the reward model."
                   + (" Dotted lines mark where each later round starts." if several_rounds else ""))
    return section("ppo", "PPO training", figure_block(ppo_curves_figure(data.ppo), "PPO curves", explanation))


def eval_points(data: RunData) -> dict[str, dict]:
    """Evaluated policies placed on the √KL axis: SFT at 0, every policy with a measured KL to SFT."""
    by_policy = data.eval.get("splits", {}).get(SAMPLE_SPLIT, {})
    points = {}
    for policy, summary in by_policy.items():
        kl = 0.0 if policy == "sft" else summary.get("kl_to_sft")
        if finite(kl):
            points[policy] = {"sqrt_kl": math.sqrt(max(0.0, kl)), "rm_score": summary.get("rm_score"),
                              "gold_score": summary.get("gold_score")}
    return points


def overoptimisation_section(data: RunData) -> str:
    points = eval_points(data)
    title = "Overoptimisation: gold vs proxy score against √KL"
    if not data.ppo and len(points) < 2:
        return section("overoptimisation", title, missing("Needs PPO metrics or evaluated policies with a KL to SFT."))
    explanation = ("Gao et al.: as the policy moves away from SFT (√KL), the proxy score keeps rising while the gold "
                   "score rises, peaks and falls; a peak inside the range means training past it wasted "
                   "episodes and a stronger KL penalty or a better RM would help. Training points use sampled "
                   "responses; eval dots use greedy responses on the eval split.")
    return section("overoptimisation", title, figure_block(overoptimisation_figure(data.ppo, points),
                                                           "gold and proxy score against sqrt KL", explanation))


def win_rate_section(data: RunData) -> str:
    win_rates = {split: {p: s["win_rate_vs_sft"] for p, s in by_policy.items() if finite(s.get("win_rate_vs_sft"))}
                 for split, by_policy in data.eval.get("splits", {}).items()}
    win_rates = {split: rates for split, rates in win_rates.items() if rates}
    if not win_rates:
        return section("win-rates", "Win rate vs SFT", missing("No win rates (only SFT was evaluated, or none)."))
    explanation = ("Above the dashed line the gold judge prefers the policy to SFT; expect base &lt; 50% &lt; PPO "
                   "≈ PPO-ptx, and a policy that only wins on eval but not on eval_unseen has learned the "
                   "training topics rather than the instructions.")
    return section("win-rates", "Win rate vs SFT",
                   figure_block(win_rate_figure(win_rates), "win rates vs SFT", explanation))


def pass_by_kind_section(data: RunData) -> str:
    by_split = {split: {p: s["pass_rate_by_kind"] for p, s in by_policy.items() if s.get("pass_rate_by_kind")}
                for split, by_policy in data.eval.get("splits", {}).items()}
    by_split = {split: rates for split, rates in by_split.items() if rates}
    if not by_split:
        return section("constraints", "Pass rate by constraint kind", missing("No per-kind pass rates."))
    explanation = ("Which instructions each policy learned to follow: a kind where PPO beats SFT is one the reward "
                   "model learned to reward; a kind where it falls behind is one it missed.")
    return section("constraints", "Pass rate by constraint kind",
                   figure_block(pass_by_kind_figure(by_split), "pass rate per constraint kind", explanation))


def response_cell(policy: str, row: dict | None) -> str:
    if row is None:
        return f'<div class="response"><div class="who">{html.escape(policy)}</div>{missing("no response")}</div>'
    verdict = ""
    if isinstance(row.get("all_passed"), bool):
        verdict = (' · <span class="pass">✓ all constraints</span>' if row["all_passed"]
                   else ' · <span class="fail">✗ constraints</span>')
    text = html.escape(row["response"]) if row["response"].strip() else '<i class="missing">(empty response)</i>'
    return (f'<div class="response"><div class="who" style="border-color:{policy_color(policy)}">'
            f'<b>{html.escape(policy)}</b> · gold {fmt(row.get("gold_score"), "{:.2f}")}{verdict}</div>'
            f'<div class="text">{text}</div></div>')


def samples_section(data: RunData, n_prompts: int) -> str:
    title = f"Sample responses ({SAMPLE_SPLIT} split)"
    if not data.samples:
        return section("samples", title, missing(f"No generations (generations/{SAMPLE_SPLIT}/POLICY.jsonl)."))
    policies = policy_order(data.samples)
    # Rows are matched by prompt id (files written by one evaluation share the prompt order; ids make it certain).
    keyed = {p: {row.get("id", i): row for i, row in enumerate(rows)} for p, rows in data.samples.items()}
    first = data.samples[policies[0]]
    blocks = []
    for i, prompt_row in enumerate(first[:n_prompts]):
        key = prompt_row.get("id", i)
        kinds = ", ".join(html.escape(str(c.get("kind")))
                          for c in prompt_row.get("constraints", []) if isinstance(c, dict))
        cells = "".join(response_cell(p, keyed[p].get(key)) for p in policies)
        blocks.append(f'<div class="sample"><div class="prompt"><span class="id">{html.escape(str(key))}</span> '
                      f'{html.escape(prompt_row["prompt"])}'
                      + (f'<div class="kinds">constraints: {kinds}</div>' if kinds else "")
                      + f'</div><div class="responses" style="grid-template-columns:repeat({len(policies)},1fr)">'
                      f"{cells}</div></div>")
    explanation = ("<p class='note'>The same prompts for every policy; verdicts and scores are the gold judge's. "
                   "Look for what the numbers hide: repetition, off-topic text, constraint tricks.</p>")
    return section("samples", title, explanation + "".join(blocks))


def training_section(data: RunData) -> str:
    if not (data.sft_curve or data.rm_curve):
        return section("training", "SFT and reward-model training", missing("No SFT or RM metrics."))
    explanation = ("SFT loss should fall steadily; the RM loss should drop below ln 2 (chance) — one that stays "
                   "at ln 2 has learned nothing from the comparisons.")
    return section("training", "SFT and reward-model training",
                   figure_block(training_figure(data.sft_curve, data.rm_curve), "SFT and RM losses", explanation))


# ---------------------------------------------------------------------------------------------- the page


CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px;
     border-bottom: 1px solid #ddd; } h3 { font-size: 15px; margin: 18px 0 6px; color: #444; }
.meta { color: #666; font-size: 13px; } nav { margin: 12px 0 0; font-size: 14px; }
nav a { margin-right: 14px; color: #4e79a7; text-decoration: none; }
table { border-collapse: collapse; font-size: 13.5px; margin: 4px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { background: #f6f6f6; font-weight: 600; } td:first-child, th:first-child { text-align: left; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.note, figcaption { color: #555; font-size: 13px; max-width: 980px; }
.missing { color: #999; font-style: italic; }
.columns { display: flex; gap: 40px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 8px 0 0; } figure img { max-width: 100%; height: auto; }
.sample { margin: 16px 0 22px; } .prompt { background: #f6f8fb; padding: 8px 12px; border-radius: 4px; }
.prompt .id { color: #888; font-size: 12px; margin-right: 4px; }
.kinds { color: #666; font-size: 12px; margin-top: 2px; }
.responses { display: grid; gap: 10px; margin-top: 8px; }
.response { border: 1px solid #e4e4e4; border-radius: 4px; min-width: 0; }
.who { font-size: 12.5px; padding: 4px 8px; border-top: 3px solid #ccc; background: #fafafa; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace;
        padding: 6px 8px; max-height: 16em; overflow: auto; }
.pass { color: #2e7d32; } .fail { color: #c62828; }
"""

NAV = (("headline", "Headline"), ("ppo", "PPO training"), ("overoptimisation", "Overoptimisation"),
       ("win-rates", "Win rates"), ("constraints", "Constraints"), ("samples", "Samples"), ("training", "SFT & RM"))


def render(data: RunData, n_samples: int) -> str:
    sections = [headline_section(data), ppo_section(data), overoptimisation_section(data), win_rate_section(data),
                pass_by_kind_section(data), samples_section(data, n_samples), training_section(data)]
    policies = data.eval.get("policies", {})
    paths = " · ".join(f"{html.escape(name)}: <code>{html.escape(str(info.get('path', '?')))}</code>"
                       for name, info in ((n, policies[n]) for n in policy_order(policies)) if isinstance(info, dict))
    nav = "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in NAV)
    title = f"instrugo report: {html.escape(data.run_dir.name)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body><h1>{title}</h1>"
            f'<div class="meta">{html.escape(str(data.run_dir))} · written {time.strftime("%Y-%m-%d %H:%M")}'
            + (f"<br>policies: {paths}" if paths else "")
            + f"</div><nav>{nav}</nav>{''.join(sections)}</body></html>\n")


def write_report(run_dir: str | Path, samples: int = 6) -> Path:
    """Write RUN_DIR/report.html (atomically) from whatever the run holds so far; returns its path."""
    data = read_run(run_dir)
    path = data.run_dir / REPORT_FILE
    atomic_write_text(path, render(data, samples))
    return path


def run_report(config: ReportConfig) -> Path:
    """The command-line entry: write the report and say where it is."""
    path = write_report(config.run_dir, config.samples)
    print(f"report: wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m instrugo.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        run_report(ReportConfig(run_dir=args[0]))
    except InputError as error:
        print(f"instrugo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
