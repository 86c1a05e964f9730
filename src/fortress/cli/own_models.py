"""Users' own architectures on the command line: the options that name and stage one, and ``import-model``.

``--arch`` takes a registry name, an entry point of the ``fortress.models`` group or a factory path
``package.module:function``; ``--arch-param`` gives the factory's keyword arguments and
``--stages``/``--classifier`` stage a factory's plain network by module names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fortress.cli.base import DataOption, DataOptions, app, console, data_spec, friendly
from fortress.errors import ConfigError

if TYPE_CHECKING:
    from fortress.models.user import Staging

__all__ = ["ArchParams", "Classifier", "Stages", "import_model_cmd", "staging_of"]

#: ``--arch-param KEY=VALUE`` (repeatable): keyword arguments of a factory ``--arch``.
ArchParams = Annotated[
    list[str] | None,
    typer.Option("--arch-param", help="Keyword argument KEY=VALUE of the --arch factory (JSON values; repeatable)."),
]
#: ``--stages NAMES``: the module names ending each stage of a factory's plain network.
Stages = Annotated[
    str | None,
    typer.Option(
        "--stages",
        help="Comma-separated module names ending each stage of the --arch factory's network "
        "(e.g. layer1,layer2,layer3,layer4).",
    ),
]
#: ``--classifier NAME``: the module name of that network's classifier.
Classifier = Annotated[str | None, typer.Option("--classifier", help="Module name of its classifier (e.g. fc).")]


def staging_of(
    stages: str | None, classifier: str | None, mean: str | None = None, std: str | None = None
) -> Staging | None:
    """The staging ``--stages``/``--classifier`` (and ``--mean``/``--std``) name; ``None`` when none is given.

    Raises:
        ConfigError: one of ``--stages``/``--classifier`` without the other, or a malformed value.
    """
    from fortress.config import parse_floats
    from fortress.models.user import Staging

    if stages is None and classifier is None:
        if mean is not None or std is not None:
            raise ConfigError("--mean and --std normalise a network staged by --stages and --classifier; give those")
        return None
    if stages is None or classifier is None:
        raise ConfigError("--stages and --classifier go together: the stage modules and the classifier module")
    return Staging(
        tuple(s for s in stages.split(",") if s.strip()),
        classifier,
        parse_floats(mean, "--mean"),
        parse_floats(std, "--std"),
    )


@app.command("import-model")
@friendly
def import_model_cmd(
    arch: Annotated[
        str, typer.Option(help="Factory package.module:function, entry point of fortress.models, or registry name.")
    ],
    weights: Annotated[Path, typer.Option(help="The trained network's state dict (safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the saved model (a victim).")],
    arch_param: ArchParams = None,
    stages: Stages = None,
    classifier: Classifier = None,
    mean: Annotated[str | None, typer.Option(help="Comma-separated per-channel mean the network expects.")] = None,
    std: Annotated[str | None, typer.Option(help="Comma-separated per-channel std the network expects.")] = None,
    data: DataOption = None,
    data_option: DataOptions = None,
) -> None:
    """Save a user's already-trained network as a fortress victim (then protect, defend, attack or serve it)."""
    from fortress.bench.pipeline import import_model
    from fortress.config import parse_params

    params = parse_params(arch_param or [], what="--arch-param")
    staging = staging_of(stages, classifier, mean, std)
    spec = data_spec(data, data_option)
    _, acc = import_model(arch, weights, params=params, staging=staging, data=spec, out=out)
    console.print(f"{arch} with {weights}: ID test accuracy {100 * acc:.2f}% — saved to {out}", highlight=False)
