"""The documented metric-record keys (biasgen.records) are the ones the report views read."""
import typing

from biasgen.experiments import experiments
from biasgen.records import HIERARCHY_KEYS, IMAGE_KEYS, MetricRecord


def test_image_and_hierarchy_keys_split_the_record_type():
    assert IMAGE_KEYS | HIERARCHY_KEYS == set(typing.get_type_hints(MetricRecord))
    assert IMAGE_KEYS & HIERARCHY_KEYS == {"step"}


def test_every_report_column_reads_a_documented_key_of_its_experiment():
    keys = {"audit": IMAGE_KEYS, "hierarchy": HIERARCHY_KEYS}
    for kind, documented in keys.items():
        columns = experiments()[kind].report_view.columns
        assert columns, kind
        read = {c.key for c in columns} | {c.err for c in columns if c.err}
        assert read <= documented, (kind, read - documented)
