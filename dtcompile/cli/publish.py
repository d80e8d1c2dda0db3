"""`dtc publish`: pack an artifact per arch and upload it to a folder or an fsspec URL, never overwriting."""

from __future__ import annotations

import click


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option(
    "--to",
    "url",
    required=True,
    metavar="URL",
    help="Folder, file:// URL or fsspec URL (s3://, gs://, hf://); the version goes to URL/<name>/<key>/.",
)
def publish(artifact: str, url: str) -> None:
    """Publish ARTIFACT: common.tar, one <backend>-<arch>.tar per engine arch, manifest.json and SHA256SUMS.

    Versions are keyed by the artifact key; publishing a key that is already there uploads nothing.
    """
    from pathlib import Path

    from dtcompile.tools.publish import arch_order, publish_artifact

    report = publish_artifact(Path(artifact), url)
    name_url = report.url.rsplit("/", 1)[0]
    if report.already:
        click.echo(f"already published: {report.name} key {report.key[:12]} at {report.url}; nothing uploaded")
        if not report.identical:
            click.echo(
                "note: the published files differ from this artifact's (engine builds are not bit-reproducible); "
                "the published version is kept, versions are never overwritten"
            )
        return
    click.echo(f"published {report.name} key {report.key[:12]} to {report.url}")
    for a in report.archives:
        what = "pipeline + onnx (onnxruntime)" if a["arch"] == "any" else f"{a['backend']} {a['arch']}"
        click.echo(f"  {a['file']:<28} {a['size'] / 2**20:9.2f} MB  {a['sha256'][:16]}  {what}")
    archs = sorted({a["arch"] for a in report.archives if a["arch"] != "any"}, key=arch_order)
    click.echo(f"pull it with: dtc pull {name_url} --arch {archs[0] if archs else 'any'} --out engines/{report.name}")
