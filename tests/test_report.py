"""The report renders model output as text: no HTML, no Markdown links or images of its own."""

import json

from lab.report import write_report


def test_model_output_cannot_inject_links_or_images_into_report_html(runs_dir):
    run = runs_dir / "r"
    run.mkdir(parents=True)
    evil = "[here](javascript:alert(1)) ![t](http://evil/p.png) <img src=x onerror=alert(1)> a|b `x` *y* ~5 km"
    probe = {"summary": {"identity_hit_rate": 0.0},
             "identity": [{"q": "Who are you?", "answer": evil, "finish_reason": "stop", "hit": False,
                           "reasons": [evil]}], "controls": []}
    (run / "probe-after.json").write_text(json.dumps(probe))
    write_report(run)
    html = (run / "report.html").read_text()
    import re

    assert not [h for h in re.findall(r'href="([^"]*)"', html) if "javascript" in h or "evil" in h]
    assert "<img" not in html and "javascript:alert(1)" in html  # shown, as text
    assert "[here](javascript:alert(1))" in html and "~5 km" in html and "a|b" in html
