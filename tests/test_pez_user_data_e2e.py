"""A user's folder of images through the whole pez workflow (issue 15), with the README's two configs as written
(only data.path pointed at the fixtures), in ONE Snakemake run: a folder with captions.csv (the tiny CLIP trains on
its pairs, the metric is the caption ratio) and one without captions (the metric is the similarity itself, the
tiny CLIP learns the generated shapes). The fixtures are a few tens of small shapes images with files that are
not images among them, so the data checks have something to count."""
from __future__ import annotations

import json

import pytest
import yaml

from e2e_support import readme_config, snakemake
from pez_images import write_image_folder

pytestmark = pytest.mark.e2e

CAPTIONED, UNCAPTIONED = "my_images", "my_uncaptioned"  # the README configs' experiment names


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("pez_user")
    write_image_folder(work / "captioned", n=60, extra={"notes.txt": b"shot on a phone\n", "broken.png": b"<html>"})
    write_image_folder(work / "uncaptioned", n=12, captions=None, seed=3, extra={"README.md": b"# my pictures\n"})
    experiments = {}
    for name, folder in (("pez-images-captions", "captioned"), ("pez-images", "uncaptioned")):
        experiments |= readme_config(name, work / folder)["experiments"]
    assert set(experiments) == {CAPTIONED, UNCAPTIONED}
    (work / "config.yaml").write_text(yaml.safe_dump({"experiments": experiments}))
    proc = snakemake(work, "--cores", "2", "--resources", "gpu=1", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


def _ready(work, exp):
    return json.loads((work / "results" / exp / "data" / "ready.json").read_text())


def test_both_folders_reach_the_final_report_with_the_metric_that_fits(workflow):
    for exp, metric in ((CAPTIONED, "val/caption_ratio"), (UNCAPTIONED, "val/similarity")):
        assert (workflow / "reports" / exp / "final_report.md").is_file()
        resolved = yaml.safe_load((workflow / "results" / exp / "experiment.yaml").read_text())
        assert resolved["metric"]["name"] == metric
        base = json.loads((workflow / "results" / exp / "baseline" / "metrics.json").read_text())
        assert base["primary"]["name"] == metric and base["status"] == "done"


def test_data_checks_count_what_was_skipped_and_split(workflow):
    checks = _ready(workflow, CAPTIONED)["data_checks"]
    assert checks["rows"]["images"] == 60 and checks["rows"]["captions"] == 60
    assert checks["rows"]["clip_train"] == 48 and checks["rows"]["held_out"] == 12
    dropped = {d["reason"]: d for d in checks["dropped"]}
    assert dropped["not an image (by its extension)"]["examples"] == ["notes.txt"]
    assert dropped["unreadable or truncated image"]["count"] == 1
    assert dropped["unreadable or truncated image"]["examples"] == ["broken.png"]
    bare = _ready(workflow, UNCAPTIONED)["data_checks"]
    assert bare["rows"]["images"] == 12 and bare["rows"]["clip_train"] == 0 and bare["rows"]["held_out"] == 12
    assert [d["examples"] for d in bare["dropped"]] == [["README.md"]]
    assert any("caption ratio is unavailable" in w for w in bare["warnings"])
    assert any("knows only shapes" in w for w in bare["warnings"])


def test_the_tiny_clip_trained_steps_on_the_captions_or_the_shapes(workflow):
    for exp, trained_on in ((CAPTIONED, None), (UNCAPTIONED, "the generated shapes (the images have no captions)")):
        clip = json.loads((workflow / "results" / exp / "data" / "clip" / "clip_metrics.json").read_text())
        assert clip["steps"] > 0 and clip["trained_on"] == trained_on
    clip = json.loads((workflow / "results" / CAPTIONED / "data" / "clip" / "clip_metrics.json").read_text())
    assert clip["batch_size"] == 16 and clip["retrieval_val_test"]["n_images"] == 12


def test_reports_say_the_caption_ratio_is_unavailable_without_captions(workflow):
    reports = workflow / "reports"
    # the diagnostic report's Data section: what was skipped, and the warnings
    data = (reports / CAPTIONED / "diagnostic_report.md").read_text().split("## Data", 1)[1].split("\n## ", 1)[0]
    assert "unreadable or truncated image" in data and "broken.png" in data and "notes.txt" in data
    data = (reports / UNCAPTIONED / "diagnostic_report.md").read_text().split("## Data", 1)[1].split("\n## ", 1)[0]
    assert "README.md" in data and "the caption ratio is unavailable" in data and "knows only shapes" in data
    for name in ("diagnostic_report.md", "final_report.md"):
        text = (reports / UNCAPTIONED / name).read_text()
        assert "the caption ratio is unavailable" in text
        assert "It knows only coloured shapes" in text
        captioned = (reports / CAPTIONED / name).read_text()
        assert "caption ratio is unavailable" not in captioned and "PEZ / caption (ids)" in captioned
    final = json.loads((workflow / "results" / UNCAPTIONED / "final" / "final.json").read_text())
    assert "test/similarity" in final["test"] and "test/caption_ratio" not in final["test"]
    prompts = json.loads((workflow / "results" / UNCAPTIONED / "final" / "test" / "prompts_test.json").read_text())
    assert all(t["caption"] is None and t["file"].endswith((".png", ".jpg")) for t in prompts["targets"])
