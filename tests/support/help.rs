//! Reading `hlstore --help` pages: the subcommands a page lists and the options it takes.

/// The subcommand paths below `path` (`["backup", "create"]`, ...) that the help page
/// `help` of `path` lists (its `Commands:` section, `help` left out).
pub fn subcommands(path: &[String], help: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if !line.starts_with("  ") {
                in_commands = false;
                continue;
            }
            if line.starts_with("   ") {
                continue; // a wrapped description, not a command
            }
            let name = line.split_whitespace().next().unwrap_or("");
            if !name.is_empty() && name != "help" {
                let mut p = path.to_vec();
                p.push(name.to_string());
                out.push(p);
            }
        }
    }
    out
}

/// Whether the help page `help` lists the long option `flag` (e.g. `--json`) as an option
/// of its own (a line starting with it), not merely mentions it in a description.
pub fn has_option(help: &str, flag: &str) -> bool {
    help.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix(flag).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '=', '<', ',']))
    })
}

/// Every subcommand path of `hlstore`, found by walking the help pages from the top;
/// `help_of(path)` returns the `--help` page of `path`. Each entry comes with its page
/// and whether it is a leaf (lists no subcommands).
pub fn walk(help_of: impl Fn(&[String]) -> String) -> Vec<(Vec<String>, String, bool)> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let help = help_of(&path);
        let subs = subcommands(&path, &help);
        out.push((path, help, subs.is_empty()));
        todo.extend(subs);
    }
    out
}
