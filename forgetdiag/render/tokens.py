"""Rendering of :class:`forgetdiag.analyses.tokens.TokensResult`: rich tables, HTML, the mask file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Group
from rich.text import Text

from forgetdiag.analyses.tokens import TokensResult, mask_records, summary_text
from forgetdiag.render import html
from forgetdiag.render.fmt import num, pct, simple_table
from forgetdiag.render.output import write_atomic


def _p(logprob: float) -> str:
    return num(math.exp(logprob) if math.isfinite(logprob) else None, ".2g")


def _lp(logprob: float) -> str:
    return num(logprob, ".2f")


def summary_rows(result: TokensResult) -> list[list[str]]:
    s = result.stats()
    return [
        ["examples", str(s["n_examples"])],
        ["answer tokens scored (EOS included)", str(s["n_tokens"])],
        [f"tokens with p < {result.threshold:g}", f"{s['n_below']} ({pct(s['share_below'])})"],
        ["examples holding one", str(s["examples_with_hard_token"])],
        ["mean log-prob (nats)", _lp(s["mean_logprob"])],
        ["median p", _p(s["median_logprob"])],
        ["10th percentile p", _p(s["logprob_p10"])],
    ]


def _quoted(text: str) -> str:
    """A token's text in quotes, so that its leading space or newline shows."""
    return repr(text)


def token_rows(result: TokensResult) -> list[list[str]]:
    """The hardest tokens: example, position, token, what the old model expected, log-prob, p."""
    return [
        [str(t.example), str(t.position), _quoted(t.token), _quoted(t.expected), _lp(t.logprob), _p(t.logprob)]
        for t in result.hardest_tokens()
    ]


def example_rows(result: TokensResult) -> list[list[str]]:
    """The hardest examples: row, prompt, answer, old model's answer, mean log-prob, hard tokens."""
    return [
        [
            str(e.index),
            e.prompt,
            e.answer,
            e.expected_text,
            _lp(e.mean_logprob()),
            str(int(e.hard(result.threshold).sum())),
        ]
        for e in result.hardest_examples()
    ]


def frequent_rows(result: TokensResult) -> list[list[str]]:
    return [
        [_quoted(f["token"]), str(f["hard"]), str(f["occurrences"]), _lp(f["mean_logprob"])]
        for f in result.frequent_hard()
    ]


TOKEN_COLUMNS = ["row", "position", "token", "old model expected", "log-prob", "p"]
EXAMPLE_COLUMNS = ["row", "prompt", "answer", "old model says", "mean log-prob", "hard tokens"]
FREQUENT_COLUMNS = ["token", "times hard", "occurrences", "mean log-prob"]


def tokens_table(result: TokensResult) -> Group:
    """The summary, the hardest tokens, the hardest examples and the most often hard tokens."""
    parts = [
        Text(summary_text(result), style="bold"),
        simple_table("Summary", ["", "value"], summary_rows(result)),
        simple_table("Hardest tokens", TOKEN_COLUMNS, token_rows(result), left=4),
        simple_table("Hardest examples (lowest mean log-prob)", EXAMPLE_COLUMNS, example_rows(result), left=4),
    ]
    if frequent := frequent_rows(result):
        parts.append(simple_table(f"Tokens most often below p = {result.threshold:g}", FREQUENT_COLUMNS, frequent))
    parts.append(
        Text(
            "Teacher forced: each token is scored after the true prefix; 'old model "
            "expected' is its most likely token there. Positions index input_ids "
            "(prompt, answer, EOS) as in the --write-mask file.",
            style="dim",
        )
    )
    return Group(*parts)


def _histogram(result: TokensResult):
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Histogram(
            x=result.logprobs(),
            nbinsx=60,
            marker_color="#2f6fb0",
            hovertemplate="log-prob %{x}: %{y} tokens<extra></extra>",
        )
    )
    fig.add_vline(
        x=math.log(result.threshold),
        line={"dash": "dash", "color": "#d64545"},
        annotation_text=f"p = {result.threshold:g}",
    )
    fig.update_layout(
        title=f"Log-probabilities of the answer tokens of {result.data} under {result.checkpoint}",
        xaxis_title="log p (nats)",
        yaxis_title="tokens",
        template="plotly_white",
        bargap=0.02,
    )
    return fig


def tokens_sections(result: TokensResult) -> list[html.Section]:
    """HTML sections (also used by ``forgetdiag report``)."""
    s = result.stats()
    kind = "info" if math.isnan(s["share_below"]) or s["share_below"] < 0.1 else "mixed"
    sections = [
        html.Section(
            "Token difficulty under the old model",
            [
                html.banner(summary_text(result), kind),
                html.table(["", "value"], summary_rows(result)),
                html.figure(_histogram(result), height=380),
                html.paragraph(
                    "Every completion token (the answer's tokens, then EOS) is scored teacher "
                    "forced under the old model. Tokens it finds very unlikely drive more "
                    "forgetting when fine-tuned on; --write-mask writes a per-token keep/drop "
                    f"mask that drops those with p < {result.threshold:g}.",
                    cls="note",
                ),
            ],
        ),
        html.Section("Hardest tokens", [html.table(TOKEN_COLUMNS, token_rows(result), left=4)]),
        html.Section("Hardest examples", [html.table(EXAMPLE_COLUMNS, example_rows(result), left=4)]),
    ]
    if frequent := frequent_rows(result):
        sections.append(html.Section("Tokens most often hard", [html.table(FREQUENT_COLUMNS, frequent)]))
    return sections


def write_tokens_html(path: str | Path, result: TokensResult) -> Path:
    return html.write_page(
        path, "forgetdiag tokens", tokens_sections(result), subtitle=f"{result.data} under {result.checkpoint}"
    )


def write_mask(path: str | Path, result: TokensResult) -> Path:
    """Write :func:`forgetdiag.analyses.tokens.mask_records` as JSONL (one row per line), atomically."""
    rows = mask_records(result)
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
