"""The code hash that makes committed reports fresh by construction: what counts and what does not."""

from __future__ import annotations

import shutil

from sdpo_sim.provenance import PACKAGE, code_hash, result_files


def _copy(tmp_path):
    dst = tmp_path / "sdpo_sim"
    shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_the_hash_reads_every_result_module_and_spec_but_not_the_front_end():
    names = {str(f.relative_to(PACKAGE)) for f in result_files()}
    assert {"train.py", "teachers.py", "claims/measure.py", "core/losses/distill.py", "specs/claims.yaml"} <= names
    assert not any(n.startswith("commands/") or n in ("cli.py", "__main__.py") for n in names)
    assert "promote.py" not in names  # the claims job never imports it: it cannot change a claim's number


def test_a_module_counts_once_the_claims_job_imports_it(tmp_path):
    pkg = _copy(tmp_path)
    before = code_hash(pkg)
    (pkg / "promote.py").write_text((pkg / "promote.py").read_text() + "\nUNUSED = 1\n")
    assert code_hash(pkg) == before
    stats = pkg / "stats.py"
    stats.write_text(stats.read_text() + "\nfrom . import promote  # noqa\n")
    assert "promote.py" in {str(f.relative_to(pkg)) for f in result_files(pkg)} and code_hash(pkg) != before


def test_docstrings_comments_and_the_cli_do_not_change_the_hash_but_code_and_specs_do(tmp_path):
    pkg = _copy(tmp_path)
    before = code_hash(pkg)
    assert before == code_hash(PACKAGE)  # a copy hashes the same: no absolute paths inside
    teachers = pkg / "teachers.py"
    text = teachers.read_text()
    teachers.write_text(text.replace('"""Self-teachers of the toy world', '"""Self-teachers (reworded) of the toy world', 1) + "\n# a comment\n")
    (pkg / "commands" / "run.py").write_text((pkg / "commands" / "run.py").read_text() + "\nUNUSED = 1\n")
    train = pkg / "train.py"
    train_text = train.read_text()
    assert 'rho: float = setting(0.5, "' in train_text
    train.write_text(train_text.replace('rho: float = setting(0.5, "', 'rho: float = setting(0.5, "(reworded help) ', 1))
    assert code_hash(pkg) == before
    train.write_text(train_text.replace('rho: float = setting(0.5, "', 'rho: float = setting(0.25, "', 1))
    assert code_hash(pkg) != before  # a default is code
    train.write_text(train_text)
    teachers.write_text(text.replace("LINK_SD = 0.5", "LINK_SD = 0.25", 1))
    changed = code_hash(pkg)
    assert changed != before
    teachers.write_text(text)
    spec = pkg / "specs" / "quick.yaml"
    spec.write_text(spec.read_text().replace("steps:", "steps:  ", 1) + "\n")
    assert code_hash(pkg) not in (before, changed)
