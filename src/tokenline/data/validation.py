"""The record validation suite: Great Expectations over a table of per-record features.

Each expectation carries the rejection reason it stands for. A record failing several is
rejected with the first reason in SUITE order, so a truncated file is `undecodable`, not
also `too_small`: features that need a decoded image stay null (and Great Expectations
skips nulls) once an earlier check fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tokenline.config import ValidateParams


@dataclass(frozen=True)
class Check:
    """One expectation of the suite and the reason a failing record is rejected with."""

    reason: str
    expectation: str  # class name in great_expectations.expectations
    column: str
    options: dict


def build_checks(params: ValidateParams) -> list[Check]:
    """The suite, in the order reasons are assigned."""
    checks = [
        # First, so a file the source refused to read (it resolves outside the source's root)
        # is rejected for that, not as the empty file it was offered as.
        Check("outside_source", "ExpectColumnValuesToBeNull", "outside_source", {}),
        Check("empty_file", "ExpectColumnValuesToBeBetween", "file_bytes", {"min_value": 1}),
        Check("not_an_image", "ExpectColumnValuesToBeInSet", "header_ok", {"value_set": [True]}),
        Check("image_too_large", "ExpectColumnValuesToBeBetween", "max_side", {"max_value": params.max_side}),
        Check("undecodable", "ExpectColumnValuesToBeInSet", "decoded", {"value_set": [True]}),
        Check("too_small", "ExpectColumnValuesToBeBetween", "min_side", {"min_value": params.min_side}),
        Check("extreme_aspect", "ExpectColumnValuesToBeBetween", "aspect", {"max_value": params.max_aspect}),
    ]
    if params.require_caption:
        checks.append(Check("caption_missing", "ExpectColumnValuesToBeInSet", "caption_present", {"value_set": [True]}))
    checks.append(Check("caption_not_utf8", "ExpectColumnValuesToBeInSet", "caption_utf8", {"value_set": [True]}))
    if params.require_caption:
        checks.append(Check("caption_empty", "ExpectColumnValueLengthsToBeBetween", "caption", {"min_value": 1}))
    checks += [
        Check("caption_too_long", "ExpectColumnValueLengthsToBeBetween", "caption", {"max_value": params.max_caption_chars}),
        Check("license_missing", "ExpectColumnValuesToNotBeNull", "license", {}),
        Check("duplicate_image", "ExpectColumnValuesToBeNull", "duplicate_of", {}),
    ]
    return checks


FEATURE_COLUMNS = (
    "key", "outside_source", "file_bytes", "header_ok", "max_side", "decoded", "min_side", "aspect",
    "caption_present", "caption_utf8", "caption", "license", "duplicate_of",
)


def run_suite(table: pd.DataFrame, params: ValidateParams) -> tuple[dict[str, str], dict]:
    """Validate the feature table; return ({key: first failing reason}, suite summary)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    missing = set(FEATURE_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"validation table lacks columns {sorted(missing)}")
    checks = build_checks(params)
    if table.empty:
        return {}, {"success": True, "expectations": len(checks), "failed": []}
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("records").add_dataframe_asset("record_table")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": table})
    suite = gx.ExpectationSuite(name="tokenline_records")
    for check in checks:
        expectation = getattr(gxe, check.expectation)(column=check.column, meta={"reason": check.reason}, **check.options)
        suite.add_expectation(expectation)
    outcome = batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["key"]}
    )
    failing: dict[str, set[str]] = {}
    for result in outcome.results:
        reason = result.expectation_config.meta["reason"]
        for row in result.result.get("unexpected_index_list") or []:
            failing.setdefault(row["key"], set()).add(reason)
    order = [check.reason for check in checks]
    first = {key: min(reasons, key=order.index) for key, reasons in failing.items()}
    summary = {
        "success": bool(outcome.success),
        "expectations": len(checks),
        "failed": sorted({r.expectation_config.meta["reason"] for r in outcome.results if not r.success}),
    }
    return first, summary
