from __future__ import annotations

import pytest

from forwarder.records import ContainerInfo
from forwarder.tags import TemplateError, compile_template

C = ContainerInfo(
    id="0123456789ab" + "c" * 52,
    name="/web-1",
    image="nginx:1.27",
    image_id="sha256:" + "f" * 64,
)


@pytest.mark.parametrize(
    ("template", "tag"),
    [
        ("docker.{{.Name}}", "docker.web-1"),
        ("{{.ID}}", "0123456789ab"),
        ("{{.FullID}}", C.id),
        ("{{ .ImageName }}/{{.ImageID}}", "nginx:1.27/ffffffffffff"),
        ("{{.DaemonName}}.{{.Name}}.{{.ID}}", "docker.web-1.0123456789ab"),
        ("plain", "plain"),
    ],
)
def test_templates_render_like_dockers(template: str, tag: str) -> None:
    assert compile_template(template)(C) == tag


@pytest.mark.parametrize("template", ["{{.Nope}}", "{{ if .Name }}x{{end}}", "a}}b"])
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(template)


def test_a_label_in_dockers_spelling_and_the_compose_service() -> None:
    from forwarder.records import ContainerInfo as Info

    container = Info(
        id="ab" * 32, name="/web-1", labels={"com.docker.compose.service": "web", 'q"k': "v"}
    )
    render = compile_template('app.{{index .ContainerLabels "com.docker.compose.service"}}.x')
    assert render(container) == "app.web.x"
    assert compile_template('{{ index .ContainerLabels "q\\"k" }}')(container) == "v"
    # Go's index of a missing key is the empty string.
    assert compile_template('a.{{index .ContainerLabels "nope"}}')(container) == "a."
