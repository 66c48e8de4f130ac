//! `kiln docs`: the results tables of README.md and the model cards, rendered from one file,
//! `docs/results.toml` — so a figure is written once and every table that shows it agrees.
//! A table sits between `<!-- results -->` (every config's result: those marked
//! `experiment = true` only appear in the cards that name them) or `<!-- results ID ID … -->` (those
//! results) and `<!-- /results -->`; `kiln docs --check` fails, naming the files, when
//! rendering would change any of them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The file the figures live in, relative to the checkout's root.
pub const RESULTS: &str = "docs/results.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Results {
    result: Vec<Row>,
}

/// One measured config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    id: String,
    /// How the config column reads (default: the id in backticks).
    label: Option<String>,
    trains: String,
    headline: String,
    bar: String,
    /// Whether the bar is met; absent: there is no bar.
    met: Option<bool>,
    time: String,
    /// The command that reproduces it (default: `kiln train <id>`).
    command: Option<String>,
    /// An experiment beside the configs (a card's table names it; README's does not).
    #[serde(default)]
    experiment: bool,
    /// Where the figure comes from: the commit that wrote it into the file (measured with the
    /// kiln just before it). Required, so that no figure arrives without it; not rendered.
    #[allow(dead_code)]
    recorded: String,
}

impl Row {
    fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| format!("`{}`", self.id))
    }
    fn mark(&self) -> &'static str {
        match self.met {
            Some(true) => "✓",
            Some(false) => "✗",
            None => "",
        }
    }
    fn command(&self) -> String {
        self.command
            .clone()
            .unwrap_or_else(|| format!("kiln train {}", self.id))
    }
}

/// README's table: every result, without the commands (the cards have them).
fn full_table(rows: &[&Row]) -> String {
    let mut out = String::from(
        "| config | what it trains | headline (test set) | bar or reference | met | time |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.label(),
            r.trains,
            r.headline,
            r.bar,
            r.mark(),
            r.time
        ));
    }
    out
}

/// A card's table: its results with the command that reproduces each.
fn card_table(rows: &[&Row]) -> String {
    let mut out = String::from(
        "| config | headline (test set) | bar or reference | met | time | reproduce |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | `{}` |\n",
            r.label(),
            r.headline,
            r.bar,
            r.mark(),
            r.time,
            r.command()
        ));
    }
    out
}

/// `text` with every results block rendered; `file` names it in errors.
fn render(text: &str, results: &Results, file: &Path) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!-- results") {
        let open_end = rest[start..]
            .find("-->")
            .map(|i| start + i + 3)
            .with_context(|| format!("{}: an unclosed `<!-- results` marker", file.display()))?;
        let ids: Vec<&str> = rest[start + "<!-- results".len()..open_end - 3]
            .split_whitespace()
            .collect();
        let close = rest[open_end..]
            .find("<!-- /results -->")
            .map(|i| open_end + i)
            .with_context(|| {
                format!(
                    "{}: `<!-- results` without `<!-- /results -->`",
                    file.display()
                )
            })?;
        let table = if ids.is_empty() {
            full_table(
                &results
                    .result
                    .iter()
                    .filter(|r| !r.experiment)
                    .collect::<Vec<_>>(),
            )
        } else {
            let mut rows = Vec::new();
            for id in &ids {
                match results.result.iter().find(|r| r.id == *id) {
                    Some(r) => rows.push(r),
                    None => bail!(
                        "{}: results block names {id:?}, which {RESULTS} does not have",
                        file.display()
                    ),
                }
            }
            card_table(&rows)
        };
        out.push_str(&rest[..open_end]);
        out.push('\n');
        out.push_str(&table);
        rest = &rest[close..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The Markdown files that may hold results blocks: README.md and everything under docs/.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Render every results block under `root`; with `check`, change nothing and fail naming the
/// stale files. Returns the files rendered (or found up to date).
pub fn run(root: &Path, check: bool) -> Result<Vec<PathBuf>> {
    let source = root.join(RESULTS);
    let text = fs::read_to_string(&source)
        .with_context(|| format!("{}: cannot read", source.display()))?;
    let results: Results = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", source.display(), e.message()))?;
    let mut stale = Vec::new();
    let mut touched = Vec::new();
    for file in markdown_files(root) {
        let Ok(old) = fs::read_to_string(&file) else {
            continue;
        };
        if !old.contains("<!-- results") {
            continue;
        }
        let new = render(&old, &results, &file)?;
        touched.push(file.clone());
        if new != old {
            if check {
                stale.push(file.display().to_string());
            } else {
                fs::write(&file, new)
                    .with_context(|| format!("{}: cannot write", file.display()))?;
            }
        }
    }
    if !stale.is_empty() {
        bail!(
            "{} out of date with {RESULTS}: run `kiln docs` (or `just kiln docs`)",
            stale.join(", ")
        );
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        toml::from_str(
            r#"
            [[result]]
            id = "a"
            trains = "t"
            headline = "99%"
            recorded = "abc1234"
            bar = "≥ 98%"
            met = true
            time = "1 s"
            [[result]]
            id = "b"
            label = "`b` on X"
            trains = "u"
            headline = "1.0"
            recorded = "abc1234"
            bar = "—"
            time = "2 s"
            command = "kiln train b --set dataset=x"
            [[result]]
            id = "c"
            experiment = true
            trains = "v"
            headline = "3"
            recorded = "abc1234"
            bar = "—"
            time = "3 s"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn blocks_are_rendered_and_the_rest_is_kept() {
        let text = "intro\n<!-- results -->\nold\n<!-- /results -->\nmiddle\n<!-- results b -->\n<!-- /results -->\nend\n";
        let out = render(text, &results(), Path::new("x.md")).unwrap();
        assert!(
            out.starts_with("intro\n<!-- results -->\n| config |"),
            "{out}"
        );
        assert!(out.contains("| `a` | t | 99% | ≥ 98% | ✓ | 1 s |\n| `b` on X | u | 1.0 | — |  | 2 s |\n<!-- /results -->\nmiddle"), "{out}");
        assert!(out.contains("| `b` on X | 1.0 | — |  | 2 s | `kiln train b --set dataset=x` |\n<!-- /results -->\nend\n"), "{out}");
        assert!(!out.contains("old"));
        // An experiment appears where a block names it, not in the full table.
        assert!(!out.contains("| `c`"), "{out}");
        let named = render(
            "<!-- results c -->\n<!-- /results -->\n",
            &results(),
            Path::new("x.md"),
        )
        .unwrap();
        assert!(named.contains("| `c` | 3 |"), "{named}");
        // Rendering is idempotent.
        assert_eq!(render(&out, &results(), Path::new("x.md")).unwrap(), out);
        let err = render(
            "<!-- results zz -->\n<!-- /results -->",
            &results(),
            Path::new("x.md"),
        );
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("x.md: results block names \"zz\"")
        );
    }
}
