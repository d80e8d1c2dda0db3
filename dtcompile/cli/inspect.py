"""`dtc inspect`: print an artifact's manifest as a table, or as JSON."""

from __future__ import annotations

import json
from typing import Any

import click


@click.command("inspect")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest JSON.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256 against the manifest.")
@click.option("--memory", is_flag=True, help="Print the memory plan: per component weights, workspace, residency.")
@click.option("--device-memory", metavar="SIZE", help="--memory: plan for this device budget (e.g. 16GiB).")
@click.option("--residency", type=click.Choice(("all", "sequential")), help="--memory: plan for this residency.")
@click.option("--backend", default="auto", show_default=True, help="--memory: the engines' backend.")
@click.option("--arch", help="--memory: plan for this GPU arch's engines (sm_XY), e.g. on a machine without it.")
def inspect_cmd(
    artifact: str,
    as_json: bool,
    verify: bool,
    memory: bool,
    device_memory: str | None,
    residency: str | None,
    backend: str,
    arch: str | None,
) -> None:
    """Show what an artifact holds: source, versions, engines per arch, shapes, stage costs."""
    from pathlib import Path

    from dtcompile.cli.summary import echo_engines, echo_not_built
    from dtcompile.manifest import AuxEntry, Verifier, read_manifest

    if not memory and (device_memory or residency or arch or backend != "auto"):
        raise click.UsageError("--device-memory, --residency, --backend and --arch go with --memory")
    root = Path(artifact)
    m = read_manifest(root)
    if memory:
        from dtcompile.runtime.memory import parse_size, plan_memory, planned_entries

        budget = None if device_memory is None else parse_size(device_memory)
        plan = plan_memory(root, m, planned_entries(m, backend, arch), residency=residency, budget=budget)
        if as_json:
            click.echo(json.dumps(plan.to_json(), indent=2))
        else:
            click.echo("\n".join(plan.lines()))
        return
    if verify:  # every file hashed; the records let later runs skip the hash of unchanged files
        verifier = Verifier(root, "full")
        for file_entry in m.all_file_entries():
            verifier.check(file_entry)
        verifier.save()
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=2, sort_keys=True))
        return
    src = m.source
    click.echo(f"artifact   {root}  (key {m.key[:16]}, schema {m.schema_version})")
    click.echo(f"source     {src.model} [{src.kind}] {src.pipeline_class}  sha256 {(src.component_sha256 or '')[:16]}")
    click.echo(f"precision  {m.precision}   dtype {m.dtype}")
    shapes = ", ".join(f"{k} {v.min}/{v.opt}/{v.max}" for k, v in m.shapes.items())
    click.echo(f"shapes     {shapes}  (min/opt/max)")
    versions = ", ".join(f"{k} {v}" for k, v in m.versions.items() if v)
    click.echo(f"versions   {versions}")
    for comp, entry in m.components.items():
        io = ", ".join(f"{t.name}:{t.dtype}{list(t.dims)}" for t in entry.inputs or [])
        stands_in = f" (stands in for pipe.{entry.attr}, {entry.role})" if isinstance(entry, AuxEntry) else ""
        click.echo(f"{comp}{stands_in}: {entry.dtype or m.dtype}, inputs {io}")
        if entry.parity:
            p = entry.parity
            click.echo(f"  onnxruntime vs torch: rel L2 {p['rel_l2']:.2e}, max abs {p['max_abs']:.2e}")
        for line in quant_lines(entry.quant or {}):
            click.echo(f"  {line}")
        echo_engines(m, [comp])
    for s in m.stages:
        click.echo(f"stage      {s.name:<8} {s.wall_s:8.2f}s  peak RSS {s.peak_rss_mb:.0f} MB")
    echo_not_built(m)


def quant_lines(q: dict[str, Any]) -> list[str]:
    """A quantized component's two checks in a line each: (a) quantized vs unquantized and (b) the graph vs the
    fake-quant model with the gate it passed (older manifests: whatever fields they have)."""
    lines = []
    effect = (q.get("accuracy") or {}).get("summary") or {}
    if "max_rel_err" in effect:
        psnr = f", min PSNR {effect['min_psnr_db']:.1f} dB" if "min_psnr_db" in effect else ""
        lines.append(f"quant {q.get('format', '?')} (a) vs unquantized: max rel err {effect['max_rel_err']:.2e}{psnr}")
    parity = q.get("parity") or {}
    err = (parity.get("summary") or {}).get("max_rel_err")
    if err is not None:
        gate = parity.get("gate", parity.get("tolerance"))
        noise = (parity.get("noise") or {}).get("max_rel_err")
        own = f", own noise {noise:.2e}" if noise is not None else ""
        lines.append(f"quant (b) graph vs fake-quant ({parity.get('precision', '?')}): max rel err {err:.2e}, "
                     f"gate {gate:.2e} (tolerance {parity.get('tolerance', 0):.0e}{own})")  # fmt: skip
    elif parity.get("skipped"):
        lines.append(f"quant (b) skipped: {parity['skipped']}")
    return lines
