"""The C core's ordering contract is checkable: every ordered access cites a rule.

docs/design.md ("The protocol as rules") defines R1, R2, ...; every call of an
atomic helper of src/shmring/_core/atomics.h (the only file allowed to spell
``__atomic_*``) must cite, on its line or in a comment on the line above, a
rule that design.md defines.  ``python tests/test_core_rules.py`` prints the
counts.
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = ROOT / "src" / "shmring" / "_core"
DESIGN = ROOT / "docs" / "design.md"
CITE = re.compile(r"\bR(\d+)\b")


def helper_names() -> set:
    text = (CORE / "atomics.h").read_text()
    names = set(re.findall(r"SHMR_ATOMIC_(?:LOAD|STORE)\(\d+, (\w+),", text))
    names |= set(re.findall(r"static inline [\w ]+?\b(\w+)\(", text))
    names.discard("cpu_relax")                 # a pause, not a memory access
    return names


def defined_rules() -> set:
    return set(_definitions())


def _definitions() -> list:
    return [int(n) for n in re.findall(r"^- \*\*R(\d+) ", DESIGN.read_text(), re.M)]


def atomic_sites():
    """[(file, line number, calls on the line, rules cited)] for every line with an atomic access."""
    call = re.compile(r"\b(" + "|".join(sorted(helper_names())) + r")\(|__atomic_\w+")
    sites = []
    for path in sorted(CORE.glob("*.[ch]")):
        if path.name == "atomics.h":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("//")[0]
            calls = call.findall(code)
            if not calls:
                continue
            cited = {int(n) for n in CITE.findall(line)}
            if not cited and i > 0 and "/*" in lines[i - 1] and not call.search(lines[i - 1].split("/*")[0]):
                cited = {int(n) for n in CITE.findall(lines[i - 1].split("/*", 1)[1])}   # a comment line above
            sites.append((path.name, i + 1, len(calls), cited))
    return sites


def test_design_defines_each_rule_once():
    defs = _definitions()
    assert len(defs) == len(set(defs)) >= 20


def test_only_atomics_h_spells_atomic_builtins_or_volatile():
    for path in CORE.glob("*.[ch]"):
        if path.name == "atomics.h":
            continue
        text = path.read_text()
        assert "__atomic" not in text, f"{path.name} uses __atomic_* directly; use the helpers of atomics.h"
        assert not re.search(r"\bvolatile\b", text), f"{path.name}: a volatile access; use a relaxed helper"


def test_every_atomic_access_cites_a_rule_design_md_defines():
    rules, sites = defined_rules(), atomic_sites()
    assert len(sites) > 100
    missing = [f"{f}:{n}" for f, n, _, cited in sites if not cited]
    assert not missing, f"atomic accesses without a rule citation: {missing}"
    unknown = [f"{f}:{n} cites R{sorted(c - rules)}" for f, n, _, c in sites if c - rules]
    assert not unknown, f"citations of rules design.md does not define: {unknown}"


def test_the_checker_catches_a_missing_and_an_unknown_citation(tmp_path, monkeypatch):
    import shutil
    fake = tmp_path / "_core"
    shutil.copytree(CORE, fake)
    (fake / "extra.c").write_text("static void f(char *p) {\n    store_release64(p, 0);\n"
                                  "    store_release64(p, 1);   /* R999 */\n"
                                  "    /* R3, a comment above covers the next line */\n    store_release64(p, 2);\n"
                                  "    store_release64(p, 3);   /* R3 */\n    store_release64(p, 4);\n}\n")
    monkeypatch.setitem(globals(), "CORE", fake)
    sites = {(f, n): c for f, n, _, c in atomic_sites()}
    assert sites[("extra.c", 2)] == set() and sites[("extra.c", 3)] == {999}
    assert sites[("extra.c", 5)] == {3}
    assert sites[("extra.c", 7)] == set()          # a cited call above does not cover the next one


if __name__ == "__main__":
    s = atomic_sites()
    print(f"{sum(k for _, _, k, _ in s)} atomic calls on {len(s)} lines in {len({f for f, *_ in s})} files; "
          f"{sum(k for _, _, k, c in s if c)} calls on {sum(1 for *_, c in s if c)} lines cite a rule; "
          f"rules defined: {len(defined_rules())}")
