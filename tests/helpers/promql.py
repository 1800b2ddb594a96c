"""PromQL read by its syntax tree (promql-parser), for the queries the deployment ships:
which relayed stage series a query adds up before folding their per-gateway copies.

Every gateway's /metrics relays every stage's metrics, and Prometheus scrapes each gateway
(its target label `instance`), so each series of a stage arrives once per gateway. A query
counts each stage once only when the first aggregation over such a series folds those copies:
`max`/`min` by the labels that tell the stage's instances apart (`worker`), and every label
an aggregation further out groups by (`role`, ...) and a histogram's `le`; or
`max without (instance)`."""

from __future__ import annotations

import re
from collections.abc import Iterator

import promql_parser as promql

FOLDS = {"max", "min"}
TARGET_LABEL = "instance"  # the scrape target: which gateway a copy came through
INSTANCE_LABELS = {"worker"}  # what tells a stage's instances apart (one scheduler, one tokenizer)


def parse(query: str):
    """A query as Grafana sends it: its own interval macros stand for a duration."""
    return promql.parse(re.sub(r"\$__\w+", "1m", query))


def _children(node) -> list:
    if isinstance(node, promql.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, promql.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql.Call):
        return list(node.args)
    if isinstance(node, promql.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, promql.ParenExpr | promql.UnaryExpr | promql.SubqueryExpr):
        return [node.expr]
    return []


def selectors(node, above: tuple = ()) -> Iterator[tuple[promql.VectorSelector, tuple]]:
    """Every series selector in the tree with the nodes above it, innermost last."""
    if isinstance(node, promql.VectorSelector):
        yield node, above
    for child in _children(node):
        yield from selectors(child, (*above, node))


def _grouping(agg) -> tuple[str | None, set[str]]:
    if agg.modifier is None:
        return None, set()
    kind = "by" if agg.modifier.type == promql.AggModifierType.By else "without"
    return kind, set(agg.modifier.labels)


def unfolded_relays(query: str, relayed: dict[str, set[str]]) -> list[str]:
    """Why each relayed series of `query` (sample name -> its labels) is counted once per
    gateway: an empty list when every one is folded first."""
    problems = []
    for selector, above in selectors(parse(query)):
        labels = relayed.get(selector.name)
        if labels is None:  # the gateway's own metric: one copy per gateway is right
            continue
        aggs = [n for n in above if isinstance(n, promql.AggregateExpr)]
        if not aggs:
            problems.append(f"{selector.name}: not aggregated, one series per gateway")
            continue
        first, outer = aggs[-1], aggs[:-1]
        kind, grouped = _grouping(first)
        if str(first.op) not in FOLDS:
            problems.append(f"{selector.name}: {first.op} adds up the copies of every gateway")
        elif kind == "without":
            if TARGET_LABEL not in grouped or grouped & (INSTANCE_LABELS | {"le"}) & labels:
                problems.append(f"{selector.name}: `without` must drop {TARGET_LABEL} only")
        else:
            kept_further_out = {
                label for agg in outer if _grouping(agg)[0] == "by" for label in _grouping(agg)[1]
            }
            # a histogram's buckets stay apart: histogram_quantile needs `le`
            needed = (INSTANCE_LABELS | kept_further_out | {"le"}) & labels
            if not needed <= grouped:
                missing = ", ".join(sorted(needed - grouped))
                problems.append(f"{selector.name}: {first.op} must keep {missing}")
    return problems
