"""The documentation site: the generated configuration reference is current and names every
key with its type, default and meaning; every page in the nav exists; the README's and CI's
commands agree; the strict build (when mkdocs is installed: the `docs` extra)."""

import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))

import gen_config_reference as gen  # noqa: E402

from longctx.config import Config  # noqa: E402


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_config_reference_is_current():
    page = open(gen.PAGE).read()
    assert page == gen.render(), ("docs/reference/config.md is stale: run "
                                  "python docs/gen_config_reference.py")


def test_config_reference_names_every_key_with_type_default_and_meaning():
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| `([\w.]+)` \| (.+?) \| `(.*?)` \| (.*) \|$", open(gen.PAGE).read(), re.M)}
    keys = list(_leaves(Config))
    assert len(keys) > 100 and set(rows) == set(keys), set(keys) ^ set(rows)
    empty = [k for k, (tp, default, meaning) in rows.items() if not (tp and meaning.strip())]
    assert not empty, f"keys without a type or a meaning (write a comment on the field): {empty}"


def test_the_staleness_check_sees_a_change(tmp_path, monkeypatch):
    stale = tmp_path / "config.md"
    stale.write_text(gen.render().replace("optim.lr", "optim.learning_rate"))
    monkeypatch.setattr(gen, "PAGE", str(stale))
    assert gen.main(["--check"]) == 1
    stale.write_text(gen.render())
    assert gen.main(["--check"]) == 0


def _nav_files(nav):
    for item in nav:
        if isinstance(item, str):
            yield item
        else:
            for v in item.values():
                yield from (_nav_files(v) if isinstance(v, list) else [v])


def test_every_nav_page_and_image_exists():
    cfg = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))
    docs = os.path.join(ROOT, "docs")
    missing = [p for p in _nav_files(cfg["nav"]) if not os.path.exists(os.path.join(docs, p))]
    assert not missing, missing
    for dirpath, _, files in os.walk(docs):
        for f in files:
            if f.endswith(".md"):
                for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", open(os.path.join(dirpath, f)).read()):
                    assert os.path.exists(os.path.join(dirpath, img)), (f, img)


def test_readme_and_ci_run_the_same_commands():
    """The README's test section lists exactly the install / test / docs commands of .ci/run."""
    ci = [l.strip() for l in open(os.path.join(ROOT, ".ci", "run"))
          if l.strip().startswith(("pip install", "python -m pytest", "mkdocs"))]
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("## Test", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [l.split("#", 1)[0].strip() for l in block.splitlines() if l.split("#", 1)[0].strip()]
    assert cmds == ci, (cmds, ci)


@pytest.mark.slow  # seconds, and .ci/run builds the site itself
def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the `docs` extra builds the site")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()
