"""The design of a pre-registered study, the ``confirm`` experiment of a preset, as frozen objects:
`Study` (its instances, arms, hypotheses, decision rule, alpha and analysis), `Arm`, `Hypothesis`
and, for the "placement" rule, `Placement` and its `Group` objects. The preset's JSON is checked once when it loads
(`check_study`, each mistake one line); `Study.from_spec` builds the objects from it, for the plan
from the preset and for the report from ``reproduce.json`` (which keeps the preset's JSON as it was,
so that old study directories still report).

A hypothesis: ``{"name", "arm", "versus", "metric", "margin", "role"}`` and optionally
``"direction"`` ("higher", the default, or "lower": the arm is better where the metric, a KL say,
is lower, and the test is on versus - arm) and ``"group"`` (the "placement" rule). The rule
(``"decision"``, one of `RULES`) chooses the roles it reads (`ROLES_OF`); the "placement" rule also
needs ``"placement": {"baseline", "metric", "groups": [{"name", "prioritized", "matched"}]}``.
``"analysis"``: "pooled" (the (instance, seed) units, the default) or "instances" (the
per-instance means), the one the decision reads. The tests and rules themselves are
`report.paired`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..runs import UserError
from .preset_fields import check_keys, check_name

ALPHA = 0.05  # the family-wise level of a study that does not set "alpha"
Role = Literal["primary", "control", "safety", "comparison", "superiority", "equivalence"]
RULES = ("confirm", "per-arm", "placement")  # the decision rules: report.paired.decide, decide_per_arm and decide_placement
# The roles each rule reads; "comparison" and, outside placement, "equivalence" are tested (and in
# Holm's family) but enter no verdict.
ROLES_OF: dict[str, tuple[Role, ...]] = {"confirm": ("primary", "control", "safety", "comparison", "equivalence"),
                                         "per-arm": ("primary", "control", "safety", "comparison", "equivalence"),
                                         "placement": ("superiority", "equivalence", "comparison")}
DIRECTIONS = ("higher", "lower")  # where the metric is better: an accuracy higher, a KL to the reference lower
ANALYSES = ("pooled", "instances")  # the decision's units: (instance, seed) pairs, or per-instance means
HYPOTHESIS_KEYS = {"name", "arm", "versus", "metric", "margin", "role"}
HYPOTHESIS_OPTIONAL = {"direction", "group"}
PLACEMENT_KEYS = {"baseline", "metric", "groups"}
GROUP_KEYS = {"name", "prioritized", "matched"}


@dataclass(frozen=True)
class Arm:
    """One arm of an RL experiment: its name (a directory) and its `RLConfig` overrides."""

    name: str
    overrides: dict = field(hash=False)

    @staticmethod
    def parse_all(arms: list, where: str) -> tuple[Arm, ...]:
        """The ``arms`` of an experiment (``where``: ``"<preset>: experiments.<experiment>"``), each checked."""
        out = []
        for arm in arms:
            if not isinstance(arm, dict):
                raise UserError(f"{where}: each arm is an object with a name and RLConfig fields")
            check_name(arm.get("name"), f"{where} arm")
            out.append(Arm(arm["name"], {k: v for k, v in arm.items() if k != "name"}))
        return tuple(out)


@dataclass(frozen=True)
class Hypothesis:
    """One pre-registered comparison of two arms on a ``final/...`` metric, at a margin in its units."""

    name: str
    arm: str
    versus: str
    metric: str
    margin: float
    role: Role
    direction: str = "higher"
    group: str | None = None

    def compared(self) -> str:
        """The difference it tests, as the tables write it."""
        if self.direction == "lower":
            return f"{self.versus} - {self.arm} (lower is better)"
        return f"{self.arm} - {self.versus}"


@dataclass(frozen=True)
class Group:
    """A strength of the "placement" rule: a prioritized arm and the uniform arm matched to it."""

    name: str
    prioritized: str
    matched: str


@dataclass(frozen=True)
class Placement:
    """The "placement" rule's baseline arm, the metric of the placement share, and its groups."""

    baseline: str
    metric: str
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class Study:
    """A pre-registered study: its model ``instances``, ``arms`` and ``hypotheses``, the decision
    ``rule`` (one of `RULES`), ``alpha``, the ``analysis`` the rule reads, the placement groups
    (rule "placement"), the report section's ``title`` and the ``preregistration`` document."""

    instances: tuple[str, ...]
    arms: tuple[Arm, ...]
    hypotheses: tuple[Hypothesis, ...]
    rule: str = "confirm"
    alpha: float = ALPHA
    analysis: str = "pooled"
    placement: Placement | None = None
    title: str | None = None
    preregistration: str | None = None

    @classmethod
    def from_spec(cls, spec: dict, where: str = "reproduce.json: experiments.confirm") -> Study:
        """The study as a preset states it (``spec``: its ``confirm`` experiment, checked by `check_study`
        when the preset loaded); the plan builds it from the preset, the report from reproduce.json."""
        placement = spec.get("placement")
        return cls(tuple(spec["models"]), Arm.parse_all(spec["arms"], where),
                   tuple(Hypothesis(**h) for h in spec["hypotheses"]), spec.get("decision", "confirm"), spec.get("alpha", ALPHA),
                   spec.get("analysis", "pooled"),
                   None if placement is None else Placement(placement["baseline"], placement["metric"],
                                                            tuple(Group(**g) for g in placement["groups"])),
                   spec.get("title"), spec.get("preregistration"))

    def analysed_arms(self) -> set[str]:
        """The arms its analysis reads: those its hypotheses compare, and its placement groups' and baseline."""
        named = {name for h in self.hypotheses for name in (h.arm, h.versus)}
        if self.placement is None:
            return named
        return named | {self.placement.baseline} | {name for g in self.placement.groups for name in (g.prioritized, g.matched)}

    def metrics(self) -> list[str]:
        """Every endpoint a hypothesis (or the placement share) reads, in order, once."""
        return list(dict.fromkeys([h.metric for h in self.hypotheses] + ([self.placement.metric] if self.placement else [])))


def check_study(spec: dict, where: str) -> None:
    """A study's hypotheses, its decision rule and what the rule needs, each checked once (one line per error)."""
    arms = {arm.get("name") for arm in spec["arms"] if isinstance(arm, dict)}
    if not isinstance(spec["hypotheses"], list) or not spec["hypotheses"]:
        raise UserError(f"{where}: 'hypotheses' must be a non-empty list")
    rule = spec.get("decision", "confirm")
    if rule not in RULES:
        raise UserError(f"{where}: 'decision' is one of {', '.join(RULES)}, got {rule!r}")
    if (rule == "placement") != ("placement" in spec):
        raise UserError(f"{where}: 'placement' (baseline, metric, groups) goes with, and only with, \"decision\": \"placement\"")
    names = []
    for h in spec["hypotheses"]:
        _check_hypothesis(h, arms, ROLES_OF[rule], f"{where}: hypothesis")
        if h["name"] in names:
            raise UserError(f"{where}: two hypotheses are named {h['name']!r}")
        names.append(h["name"])
    primaries = [h["arm"] for h in spec["hypotheses"] if h["role"] == "primary"]
    if rule == "confirm" and len(primaries) != 1:
        raise UserError(f"{where}: exactly one hypothesis has the role 'primary'")
    if rule == "per-arm" and (not primaries or len(set(primaries)) != len(primaries)):
        raise UserError(f"{where}: decision per-arm: each arm it judges has exactly one 'primary' hypothesis (and at least one arm)")
    if rule == "placement":
        _check_placement(spec, arms, where)
    elif any("group" in h for h in spec["hypotheses"]):
        raise UserError(f"{where}: a hypothesis's 'group' names a group of \"decision\": \"placement\"; this study's decision is {rule}")
    if not isinstance(spec.get("title", ""), str):
        raise UserError(f"{where}: 'title' must be a string")
    alpha = spec.get("alpha", ALPHA)
    if not isinstance(alpha, float) or not 0 < alpha < 1:
        raise UserError(f"{where}: 'alpha' must be a number in (0, 1)")
    if spec.get("analysis", "pooled") not in ANALYSES:
        raise UserError(f"{where}: 'analysis' (the one the decision reads) is one of {', '.join(ANALYSES)}, got {spec['analysis']!r}")


def _check_hypothesis(h: Any, arms: set, roles: tuple[str, ...], where: str) -> None:
    """One hypothesis: its keys, arms, metric, role (among the decision's ``roles``), margin and direction."""
    check_keys(h, HYPOTHESIS_KEYS | HYPOTHESIS_OPTIONAL, where)
    if not HYPOTHESIS_KEYS <= set(h):
        raise UserError(f"{where} {h.get('name')!r} needs {', '.join(sorted(HYPOTHESIS_KEYS))}")
    name = h["name"]
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    if h["arm"] not in arms or h["versus"] not in arms or h["arm"] == h["versus"]:
        raise UserError(f"{where} {name!r} compares arms {h['arm']!r} and {h['versus']!r}; it needs two different arms of {', '.join(sorted(arms))}")
    if not isinstance(h["metric"], str) or not h["metric"].startswith("final/"):
        raise UserError(f"{where} {name!r}: 'metric' is a key of the runs' final evaluation, 'final/...', got {h['metric']!r}")
    if h["role"] not in roles:
        raise UserError(f"{where} {name!r}: role is one of {', '.join(roles)} (with this decision rule), got {h['role']!r}")
    margin = h["margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise UserError(f"{where} {name!r}: 'margin' must be a finite number (in the metric's units), got {margin!r}")
    if h["role"] == "equivalence" and not margin > 0:
        raise UserError(f"{where} {name!r}: an equivalence hypothesis's margin is the ± bound, > 0; got {margin}")
    if h["role"] == "superiority" and margin < 0:
        raise UserError(f"{where} {name!r}: a superiority hypothesis's margin is >= 0 (below 0 it is non-inferiority); got {margin}")
    if h.get("direction", "higher") not in DIRECTIONS:
        raise UserError(f"{where} {name!r}: 'direction' (where the metric is better) is one of {', '.join(DIRECTIONS)}, got {h['direction']!r}")


def _check_placement(spec: dict, arms: set, where: str) -> None:
    """The ``placement`` object of a study decided by `report.paired.decide_placement`: its baseline
    arm, the metric of the placement share, and the groups, each a prioritized arm and its matched
    uniform arm; every hypothesis belongs to a group and compares that group's two arms."""
    placement, here = spec["placement"], f"{where}: placement"
    check_keys(placement, PLACEMENT_KEYS, here)
    if set(placement) != PLACEMENT_KEYS:
        raise UserError(f"{here} needs {', '.join(sorted(PLACEMENT_KEYS))}")
    if placement["baseline"] not in arms:
        raise UserError(f"{here}: 'baseline' must be an arm ({', '.join(sorted(arms))}), got {placement['baseline']!r}")
    if not isinstance(placement["metric"], str) or not placement["metric"].startswith("final/"):
        raise UserError(f"{here}: 'metric' (of the placement share) is a key of the final evaluation, 'final/...', got {placement['metric']!r}")
    groups = placement["groups"]
    if not isinstance(groups, list) or not groups:
        raise UserError(f"{here}: 'groups' must be a non-empty list of {{\"name\", \"prioritized\", \"matched\"}}")
    pairs = {}
    for g in groups:
        check_keys(g, GROUP_KEYS, f"{here}: group")
        if set(g) != GROUP_KEYS or not isinstance(g["name"], str) or not g["name"] or g["name"] in pairs:
            raise UserError(f"{here}: each group has a distinct non-empty 'name', a 'prioritized' and a 'matched' arm; got {g}")
        if g["prioritized"] not in arms or g["matched"] not in arms or len({g["prioritized"], g["matched"], placement["baseline"]}) < 3:
            raise UserError(f"{here}: group {g['name']!r}: 'prioritized' and 'matched' are two arms other than the baseline, got "
                            f"{g['prioritized']!r} and {g['matched']!r}")
        pairs[g["name"]] = {g["prioritized"], g["matched"]}
    for h in spec["hypotheses"]:
        if h.get("group") not in pairs:
            raise UserError(f"{where}: hypothesis {h['name']!r}: 'group' must name a group ({', '.join(pairs)}), got {h.get('group')!r}")
        if h["role"] != "comparison" and {h["arm"], h["versus"]} != pairs[h["group"]]:
            raise UserError(f"{where}: hypothesis {h['name']!r} ({h['role']}) compares {h['arm']} and {h['versus']}; "
                            f"group {h['group']!r} compares {' and '.join(sorted(pairs[h['group']]))}")
    for group in pairs:
        if not any(h["group"] == group and h["role"] != "comparison" for h in spec["hypotheses"]):
            raise UserError(f"{here}: group {group!r} has no superiority or equivalence hypothesis to decide it")
