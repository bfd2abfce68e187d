"""The planner: deterministic items whose identity depends on exactly what shapes their rows."""

from __future__ import annotations

from dataclasses import replace

from pathpatch.language.hypotheses import Facts
from pipeline.plan import (
    IDENTITY_VERSION,
    HypothesisInfo,
    Shard,
    attribution_info,
    describe,
    item_identity,
    make_plan,
)

SHARDS = tuple(Shard(index=i, start=4 * i, stop=4 * i + 4, digest=f"{i:064x}") for i in range(3))
HYPS = tuple(HypothesisInfo(name=f"h{i}", canonical=f"a0.{i}", mixed_copies=i, est_cost=0.5)
             for i in range(5))


def plan(**changes):
    args = dict(model_digest="m" * 64, shards=SHARDS, hypotheses=HYPS, group_size=2,
                metric="kl", dtype="float32")
    args.update(changes)
    return make_plan(**args)


def test_items_are_groups_times_shards_in_shard_major_order():
    p = plan()
    assert [len(g) for g in p.groups] == [2, 2, 1]
    assert len(p.items) == 9
    assert [(i.shard.index, i.group) for i in p.items[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert p.items[0].expected_rows == 8 and p.items[2].expected_rows == 4
    assert plan() == p  # deterministic
    assert "9 work items" in describe(p)


def test_identity_depends_on_what_determines_rows():
    base = {i.id for i in plan().items}
    for changed in (plan(model_digest="n" * 64), plan(metric="loss"), plan(dtype="float64"),
                    plan(hypotheses=(replace(HYPS[0], canonical="a0.9"),) + HYPS[1:]),
                    plan(hypotheses=(replace(HYPS[0], name="renamed"),) + HYPS[1:])):
        assert len(base & {i.id for i in changed.items}) < len(base)
    # cost estimates are reports, not identity
    cheap = tuple(replace(h, est_cost=9.0, mixed_copies=99) for h in HYPS)
    assert {i.id for i in plan(hypotheses=cheap).items} == base
    # and so are a hypothesis's facts: recording them changed no item of any sweep
    known = tuple(replace(h, facts=Facts("node_removal", "remove_node", h.canonical)) for h in HYPS)
    assert {i.id for i in plan(hypotheses=known).items} == base and known == HYPS


def test_appending_a_hypothesis_keeps_full_groups_and_shards():
    before = {i.id for i in plan(hypotheses=HYPS[:4]).items}
    after = plan(hypotheses=HYPS[:4] + (HypothesisInfo("h9", "a1.0"),))
    new = [i for i in after.items if i.id not in before]
    assert len(new) == len(SHARDS) and all(i.hypotheses[0].name == "h9" for i in new)
    more_data = plan(shards=SHARDS + (Shard(3, 12, 14, "f" * 64),))
    assert {i.id for i in plan().items} <= {i.id for i in more_data.items}


def test_identity_is_a_stable_hash():
    a = item_identity(model_digest="m", shard_digest="s", hypotheses=HYPS[:1], metric="kl",
                      dtype="float32")
    assert a == item_identity(model_digest="m", shard_digest="s", hypotheses=HYPS[:1],
                              metric="kl", dtype="float32")
    # a literal constant of its format version (IDENTITY_VERSION): a change of what the
    # identity hashes must bump the version and then this line
    assert IDENTITY_VERSION == "pathpatch-item/1"
    assert a == "fc65fcbfefa1dad28146fc1ce0d8d9ad"


def test_eap_ig_s_points_are_part_of_its_identity_and_eap_s_identity_is_unchanged():
    """EAP-IG's default points changed (to the EAP-IG repository's, `left`): its items hash a
    new text, so a result written at the former points is computed again; the former points,
    named `right`, keep the text they were written under, and EAP's text is as it was."""
    def ids(**a):
        info = attribution_info(edges=10, forwards=1.0, **a)
        return info.canonical, {i.id for i in plan(hypotheses=(), attributions=(info,)).items}

    before = ids(name="eap-ig-5", method="eap-ig", steps=5)  # as items were named before
    assert before[0] == "attribution eap-ig steps=5"
    left = ids(name="eap-ig-5", method="eap-ig", steps=5, points="left")
    assert left[0] == "attribution eap-ig steps=5 points=left"
    assert not left[1] & before[1]
    assert ids(name="eap-ig-5", method="eap-ig", steps=5, points="right") == before
    assert ids(name="eap", method="eap", steps=0, points="")[0] == "attribution eap steps=0"


def test_the_dry_run_table_keeps_its_columns_under_long_names():
    long = "refined, V by any route (V* | Q | K), longer still"
    hyps = (HypothesisInfo(name="short", canonical="a0.1", mixed_copies=5, est_cost=0.5),
            HypothesisInfo(name=long, canonical="a0.2", mixed_copies=12, est_cost=1.25),
            HypothesisInfo(name="x" * 90, canonical="a0.3", mixed_copies=1, est_cost=0.25))
    lines = describe(plan(hypotheses=hyps)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("group"))
    table = lines[header:header + 4]
    end = table[0].index("est. cost") + len("est. cost")  # the numbers end under this column
    assert all(line[end - 4:end] in ("0.50", "1.25", "0.25") for line in table[1:])
    assert long in table[2] and "x" * 57 + "..." in table[3]  # a very long name is cut
