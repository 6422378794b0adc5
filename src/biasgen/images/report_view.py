"""How an image audit is shown on its report page (``ImageAudit.report_view``; see :mod:`biasgen.report`):
the figures' captions, the per-checkpoint table's columns, and a conditional audit's verdicts per guidance scale."""
from __future__ import annotations

from html import escape

from ..report.kinds import Column, ReportView, Run
from .conditional import tau_text


def _interval(ci) -> str:
    return f" <small>[{escape(str(ci[0]))}, {escape(str(ci[1]))}]</small>" if isinstance(ci, list) and len(ci) == 2 else ""


def _tau(tau) -> str:
    """A tau of one scale (:func:`biasgen.images.conditional.tau_text`) with its 68% interval when located."""
    if not isinstance(tau, dict):
        return "-"
    return escape(tau_text(tau)) + (_interval(tau.get("ci")) if tau.get("step") is not None else "")


def _share(metrics) -> str:
    """The memorized fraction of one scale at the last checkpoint with its 95% interval."""
    if not isinstance(metrics, dict) or not isinstance(metrics.get("f_mem"), (int, float)):
        return "—"
    ci = metrics.get("f_mem_ci")
    interval = f" <small>[{ci[0]:.3f}, {ci[1]:.3f}]</small>" if isinstance(ci, list) and len(ci) == 2 else ""
    return f"{metrics['f_mem']:.3f}{interval}"


def guidance_section(run: Run, view: ReportView) -> str:
    """A conditional audit's verdict per guidance scale w (summary.json's ``"guidance"`` block); '' for other runs."""
    block = (run.summary or {}).get("guidance")
    if not isinstance(block, dict) or not isinstance(block.get("per_scale"), dict):
        return ""
    last = run.records[-1].get("guidance", {}) if run.records else {}
    use = block.get("use_guidance")
    rows = []
    for w, judged in block["per_scale"].items():
        p = judged.get("p_value")
        used = " (--use-guidance)" if isinstance(use, (int, float)) and f"{use:g}" == w else ""
        rows.append(
            f"<tr><th scope=\"row\">{escape(w)}{used}</th><td>{escape(str(judged.get('verdict')))}</td>"
            f"<td>{'—' if p is None else f'{p:.3g}'}</td><td>{_tau(judged.get('tau_data'))}</td>"
            f"<td>{_tau(judged.get('tau_bias'))}</td><td>{_tau(judged.get('tau_mem'))}</td>"
            f"<td>{_share(last.get(w))}</td><td>{escape(str(judged.get('recommended_step')))}"
            f"{_interval(judged.get('recommended_ci'))}</td></tr>")
    head = "".join(f"<th scope=\"col\">{h}</th>" for h in (
        "w", "verdict", "p at the test-loss minimum", "tau_data", "tau_bias", "tau_mem",
        f"memorized fraction at step {escape(str(run.records[-1]['step'])) if run.records else '—'}", "recommended step"))
    return (f"<p>Each scale judged on its own curves (the same models, noise and labels). The verdict above is at "
            f"w = {escape(str(use))}, the scale given by <code>--use-guidance</code>. Intervals: 68% for the taus and "
            f"the recommended step, 95% for the memorized fraction.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


VIEW = ReportView(
    title="twin-split audit",
    main_figure="fig_loss_twin.png",
    captions={
        "fig_loss_twin.png": "Test loss and twin distance over training, with tau_bias, tau_loss and the biased window.",
        "fig_score_similarity.png": "Score-level twin similarity on training inputs versus test inputs, per noise level.",
        "fig_memorization.png": "Memorized fraction and nearest-neighbour proximity of the samples to each split.",
        "fig_loss_bands.png": "Test-minus-train loss per noise band over training; the band where the gap "
                              "opens first is drawn bold.",
        "fig_guidance_curves.png": "Conditional twins: the contrast (twin minus control distance) and the memorized "
                                   "fraction (copies of the sample's own class in the model's split) over training, "
                                   "one line per guidance scale w.",
        "fig_guidance_taus.png": "Conditional twins: tau_data, tau_bias and tau_mem against the guidance scale w, "
                                 "with their intervals; hollow markers are bounds (not reached within the run).",
        "fig_gallery.png": "Twin samples from the same noise and their nearest training images in each twin's split, "
                           "at tau_bias and at the last checkpoint.",
    },
    columns=(
        Column("test_loss", "test loss", err="test_loss_sem"),
        Column("train_loss", "train loss"),
        Column("twin_distance", "twin distance", err="twin_distance_sem"),
        Column("same_split_distance", "same-split control", err="same_split_distance_sem"),
        Column("f_mem", "memorized fraction", err="f_mem_ci"),
        Column("copy_z", "copy z"),
        Column("nn_own_sim", "NN similarity, own split"),
        Column("nn_other_sim", "NN similarity, other split"),
        Column("nn_test_sim", "NN similarity, test"),
    ),
    gallery_figures=("fig_gallery.png",),
    sections=(("Verdict per guidance scale", guidance_section),),
)
