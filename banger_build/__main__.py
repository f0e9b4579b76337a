from banger_build.cli import entry_point

raise SystemExit(entry_point())
