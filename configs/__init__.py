"""ssvit's presets: `--config <name>` reads <name>.yaml from this folder (installed as ssvit.configs)."""
