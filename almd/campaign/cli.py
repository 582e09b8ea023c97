"""``almd run``: the campaign from a TOML file (or the built-in one), a thin layer over :class:`Campaign`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from almd.campaign.config import CampaignConfig, builtin_campaign
from almd.campaign.loop import Campaign
from almd.campaign.parallel import abort, world

__all__ = ["EXIT_STOPPED", "main"]

#: exit status of a run stopped by SIGTERM / SIGINT / SIGUSR1 after writing its checkpoint
#: (sysexits' EX_TEMPFAIL: run the same command again to continue)
EXIT_STOPPED = 75


def main(argv: list[str]) -> int:
    """Entry point of ``almd run``."""
    from almd.potentials import UnknownElementError
    from almd.settings import ConfigError

    p = argparse.ArgumentParser(prog="almd run", description="Run or resume an active-learning MD campaign. "
                                "Without a file: the built-in Si campaign (almd/data/campaign.toml: SevenNet-0 ensemble, "
                                "Stillinger–Weber reference, 300 → 900 K).")
    p.add_argument("campaign", nargs="?", help="campaign TOML ([system] [model] [reference] [md] [trigger] [learning] [run] [finetune])")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the campaign of a run directory (moved or copied ones too) "
                   "with the settings it holds")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--output", help="override run.output")
    args = p.parse_args(argv)
    if args.resume and (args.campaign or args.output):
        p.error("--resume takes the settings and the output folder from RUN_DIR: give no campaign file or --output")
    comm = world()
    try:
        if args.resume:
            cfg, args.output = _stored_config(Path(args.resume)), args.resume
        else:
            cfg = CampaignConfig.from_toml(args.campaign) if args.campaign else builtin_campaign()
        overrides = {k: v for k, v in (("steps", args.steps), ("output", args.output)) if v is not None}
        if overrides:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **overrides))
            cfg.validate()
        campaign = Campaign(cfg, comm)  # settings checked and the run directory locked: now it may be written to
        if args.campaign and comm.rank == 0 and not (campaign.output / "campaign.toml").exists():
            shutil.copyfile(args.campaign, campaign.output / "campaign.toml")  # the file as the user wrote it
        result = campaign.run()
    except (ConfigError, UnknownElementError, FileNotFoundError) as exc:
        print(f"almd run: error: {exc}", flush=True)
        abort(comm, f"almd run: error: {exc}", status=2)  # the other ranks may wait for this one
        return 2
    if result is not None and result.stopped:
        steps = ", ".join(f"walker {k} at step {v}" for k, v in sorted(result.steps.items()))
        print(f"almd run: stopped by {result.stopped} ({steps}); checkpoint written to {result.output}; "
              f"run the same command again to continue (exit status {EXIT_STOPPED})")
        return EXIT_STOPPED
    if result is not None:  # rank 0 reports
        print(json.dumps(result.summary(), indent=1))
    return 0


def _stored_config(run_dir: Path) -> CampaignConfig:
    """The settings a run directory's checkpoint was made with."""
    from almd.campaign.state import read_checkpoint
    from almd.settings import ConfigError

    if not (run_dir / "campaign.json").is_file():
        raise ConfigError(f"--resume {run_dir}: no campaign.json there; give the folder a campaign wrote (its run.output)")
    stored = read_checkpoint(run_dir)["config"]
    # None marks a default that TOML cannot spell: leave it to the default again
    def given(table: dict) -> dict:
        return {k: v for k, v in table.items() if v is not None}

    return CampaignConfig.from_dict({name: [given(t) for t in section] if isinstance(section, list) else given(section)
                                     for name, section in stored.items()})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
