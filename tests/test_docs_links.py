"""Every relative link in every `.md` file of the repository resolves (issue 30: twelve files pointed at
a design guide that a clone does not have), and no file points outside the repository for its design."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold commands, not links
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not t.startswith(EXTERNAL) and not t.startswith("#")]


def test_every_relative_md_link_resolves():
    mds = tracked("*.md")
    assert len(mds) >= 12 and REPO / "docs" / "ARCHITECTURE.md" in mds
    broken = [f"{md.relative_to(REPO)}: {target}" for md in mds for target in relative_links(md)
              if not (md.parent / target.split("#", 1)[0]).exists()]
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[ok](x.md) [gone](nowhere/README.md#part) [web](https://example.com) [anchor](#a)\n")
    assert relative_links(md) == ["x.md", "nowhere/README.md#part"]


def test_every_top_level_folder_has_a_readme():
    folders = {p.relative_to(REPO).parts[0] for p in tracked("*") if len(p.relative_to(REPO).parts) > 1}
    missing = sorted(f for f in folders if not (REPO / f / "README.md").is_file())
    assert not missing, missing


def test_no_file_points_at_a_design_guide_outside_the_repository():
    hits = [str(p.relative_to(REPO)) for p in tracked("*") if p.suffix in (".md", ".py", ".toml", ".yaml", ".yml")
            and "shared/DESIGN.md" in p.read_text(errors="replace")
            and p != Path(__file__).resolve()]
    assert not hits, hits
