//! `cargo xtask cycles`: no import circle between the modules of a crate.
//!
//! For every crate target of the workspace (each member's library and binaries, `hw-tests` and
//! `xtask` included, from `cargo metadata --no-deps`), the checker reads the target's module
//! files and draws a graph over them:
//!
//! ```text
//!   lib.rs ── mod engine; ──> engine/mod.rs ── mod source; ──> engine/source.rs
//!      ^                                                            │
//!      └──────────────── use crate::Error; (an edge) ───────────────┘
//! ```
//!
//! * The module tree comes from `mod x;` declarations (`x.rs` or `x/mod.rs`, or a `#[path]`);
//!   an inline `mod x { ... }` belongs to its file. A declaration is not an edge.
//! * File A has an edge to file B when A names a path into B with `crate::`, `super::` or
//!   `self::`: in a `use` (nested braces included) or inline in code (`crate::a::f()`).
//!   Comments, doc comments and string literals are skipped. A path resolves to the file of its
//!   longest module prefix (`crate::engine::source::Source` is `engine/source.rs`, `crate::Error`
//!   the crate root). A path into the file itself (`super::*` in an inline `mod tests`) is no
//!   edge; neither is a path relative to the current module (`pub use engine::Source;`).
//! * Convention: `#[doc(no_inline)]` on a `pub use` marks a compatibility alias (an old public
//!   path kept for one release) and is not an edge. Each one skipped is printed. When the file
//!   also uses the name itself (the `pub use` is its own import as well), it is an edge.
//!
//! A strongly connected component of more than one file is a circle: the step fails and prints
//! each cycle as a chain of files with the line of the path that makes each edge:
//!
//! ```text
//! crates/iommu-pt: src/dirty.rs:12 -> src/table.rs:8 -> src/dirty.rs
//! ```
//!
//! `cargo xtask cycles --path DIR` checks the one crate in DIR (its `src/lib.rs`, `src/main.rs`
//! and `src/bin/*`); `xtask/fixtures/cycle` is the negative control.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::rig::workspace_root;

/// The most cycles printed per strongly connected component.
const MAX_CYCLES: usize = 20;

/// Runs the check on every workspace crate, or on the crate in `dir`.
pub fn cycles(dir: Option<&Path>) -> Result<()> {
    let crates = match dir {
        Some(d) => vec![crate_at(d)?],
        None => workspace_crates()?,
    };
    let mut failures = Vec::new();
    for krate in &crates {
        let r = check(krate)?;
        for a in &r.aliases {
            println!("cycles: {}: alias, not an edge: {a}", krate.label);
        }
        if r.cycles.is_empty() {
            println!(
                "cycles: {}: {} modules, {} edges, no cycle",
                krate.name, r.modules, r.edges
            );
        } else {
            println!(
                "cycles: {}: {} modules, {} edges, {} cycle(s)",
                krate.name,
                r.modules,
                r.edges,
                r.cycles.len()
            );
            failures.extend(r.cycles);
        }
    }
    if !failures.is_empty() {
        bail!(
            "import circles between modules (move the shared item to the module it belongs to, \
             or lower):\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// One crate: its name, a label for messages (its directory) and its target roots.
#[derive(Debug)]
struct Crate {
    name: String,
    label: String,
    dir: PathBuf,
    roots: Vec<PathBuf>,
}

/// What [`check`] found in one crate, summed over its targets.
#[derive(Debug, Default)]
struct Report {
    modules: usize,
    edges: usize,
    /// `label: a.rs:L -> b.rs:M -> a.rs`, one per cycle.
    cycles: Vec<String>,
    /// `file:line path`, one per path of a `#[doc(no_inline)] pub use`.
    aliases: Vec<String>,
}

fn workspace_crates() -> Result<Vec<Crate>> {
    let meta = crate::deps::workspace_metadata()?;
    let mut crates = Vec::new();
    for p in meta["packages"].as_array().context("no packages")? {
        let name = p["name"].as_str().context("a package without name")?;
        let manifest = p["manifest_path"].as_str().context("no manifest_path")?;
        let dir = Path::new(manifest).parent().context("manifest in /")?;
        let mut roots = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let crate_kind = t["kind"].as_array().into_iter().flatten().any(|k| {
                matches!(
                    k.as_str(),
                    Some("lib" | "rlib" | "dylib" | "cdylib" | "staticlib" | "proc-macro" | "bin")
                )
            });
            if crate_kind {
                roots.push(PathBuf::from(
                    t["src_path"].as_str().context("no src_path")?,
                ));
            }
        }
        crates.push(Crate {
            name: name.to_string(),
            label: label_of(dir),
            dir: dir.to_path_buf(),
            roots,
        });
    }
    crates.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(crates)
}

/// The crate in `dir`, which need not be a workspace member (nor compile): its name from its
/// `Cargo.toml` when it has one, its roots by cargo's conventions.
fn crate_at(dir: &Path) -> Result<Crate> {
    let src = dir.join("src");
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = bins
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                if p.extension().is_some_and(|e| e == "rs") {
                    Some(p)
                } else {
                    Some(p.join("main.rs")).filter(|m| m.is_file())
                }
            })
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    if roots.is_empty() {
        bail!("{}: no src/lib.rs, src/main.rs or src/bin/", dir.display());
    }
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    let name = manifest
        .lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("name")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| label_of(dir));
    Ok(Crate {
        name,
        label: label_of(dir),
        dir: dir.to_path_buf(),
        roots,
    })
}

/// `dir` relative to the workspace root when it is inside.
fn label_of(dir: &Path) -> String {
    let root = workspace_root();
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    abs.strip_prefix(&root).unwrap_or(dir).display().to_string()
}

/// One module file of a target.
#[derive(Debug)]
struct File {
    path: PathBuf,
    /// Its module path from the crate root.
    module: Vec<String>,
    scan: Scan,
}

/// Checks every target of `krate`.
fn check(krate: &Crate) -> Result<Report> {
    let mut report = Report::default();
    for root in &krate.roots {
        let files = module_files(root)?;
        let modules: HashMap<Vec<String>, usize> = files
            .iter()
            .enumerate()
            .flat_map(|(id, f)| {
                std::iter::once(f.module.clone())
                    .chain(
                        f.scan
                            .inline
                            .iter()
                            .map(|c| [&f.module[..], &c[..]].concat()),
                    )
                    .map(move |m| (m, id))
            })
            .collect();
        // (from, to) -> the first line in `from` naming a path into `to`.
        let mut edges: BTreeMap<(usize, usize), u32> = BTreeMap::new();
        let rel = |p: &Path| {
            p.strip_prefix(&krate.dir)
                .unwrap_or(p)
                .display()
                .to_string()
        };
        for (from, f) in files.iter().enumerate() {
            for r in &f.scan.refs {
                let here = [&f.module[..], &r.ctx[..]].concat();
                let Some(to) = resolve(&modules, &here, &r.segs) else {
                    continue;
                };
                if r.alias {
                    report.aliases.push(format!(
                        "{}:{} {}",
                        rel(&f.path),
                        r.line,
                        r.segs.join("::")
                    ));
                } else if to != from {
                    let l = edges.entry((from, to)).or_insert(r.line);
                    *l = (*l).min(r.line);
                }
            }
        }
        report.modules += files.len();
        report.edges += edges.len();
        let mut adj = vec![Vec::new(); files.len()];
        for &(a, b) in edges.keys() {
            adj[a].push(b);
        }
        for scc in tarjan(&adj) {
            if scc.len() < 2 {
                continue;
            }
            for cycle in elementary_cycles(&adj, &scc) {
                let mut chain = String::new();
                for (k, &n) in cycle.iter().enumerate() {
                    let next = cycle[(k + 1) % cycle.len()];
                    chain += &format!("{}:{} -> ", rel(&files[n].path), edges[&(n, next)]);
                }
                chain += &rel(&files[cycle[0]].path);
                report.cycles.push(format!("{}: {chain}", krate.label));
            }
        }
    }
    Ok(report)
}

/// Every module file of the target rooted at `root`, sorted by path.
fn module_files(root: &Path) -> Result<Vec<File>> {
    let mut files: Vec<File> = Vec::new();
    // (path, module path, whether its children live beside it, as for lib.rs and mod.rs)
    let mut queue = vec![(root.to_path_buf(), Vec::<String>::new(), true)];
    while let Some((path, module, mod_rs)) = queue.pop() {
        if files.iter().any(|f| f.path == path) {
            continue;
        }
        let src = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let scan = scan(&src);
        let dir = path.parent().context("a file in /")?.to_path_buf();
        for m in &scan.mods {
            // Children of a non-mod-rs file `a/b.rs` live in `a/b/`; inline modules add a
            // directory each.
            let mut base = dir.clone();
            if !mod_rs {
                base.push(path.file_stem().context("a file without name")?);
            }
            let child_module = [&module[..], &m.ctx[..], std::slice::from_ref(&m.name)].concat();
            let (file, child_mod_rs) = match &m.path {
                Some(p) if m.ctx.is_empty() => (dir.join(p), true),
                Some(p) => (base.join(m.ctx.join("/")).join(p), true),
                None => {
                    let base = base.join(m.ctx.join("/"));
                    let flat = base.join(format!("{}.rs", m.name));
                    let nested = base.join(&m.name).join("mod.rs");
                    if flat.is_file() {
                        (flat, false)
                    } else if nested.is_file() {
                        (nested, true)
                    } else {
                        bail!(
                            "{}:{}: mod {}; has neither {} nor {}",
                            path.display(),
                            m.line,
                            m.name,
                            flat.display(),
                            nested.display()
                        );
                    }
                }
            };
            queue.push((file, child_module, child_mod_rs));
        }
        files.push(File { path, module, scan });
    }
    // By path, so that each cycle is printed from the same file on every run.
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The file a path written in module `here` points into: the file of its longest module prefix.
/// `None` for a path that leaves the crate (`super` above the root).
fn resolve(
    modules: &HashMap<Vec<String>, usize>,
    here: &[String],
    segs: &[String],
) -> Option<usize> {
    let mut full: Vec<String> = match segs.first()?.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => here.get(..here.len().checked_sub(1)?)?.to_vec(),
        _ => return None,
    };
    let base = full.len();
    let mut rest = segs[1..].iter().peekable();
    while rest.peek().is_some_and(|s| *s == "super") {
        full.pop()?;
        rest.next();
    }
    let base = base.min(full.len());
    full.extend(rest.cloned());
    (base..=full.len())
        .rev()
        .find_map(|k| modules.get(&full[..k]).copied())
}

/// Tarjan's strongly connected components of the graph `adj`.
fn tarjan(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State<'_>, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &s.adj[v] {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(i) if s.on_stack[w] => s.low[v] = s.low[v].min(i),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            scc.sort_unstable();
            s.out.push(scc);
        }
    }
    let n = adj.len();
    let mut s = State {
        adj,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.out
}

/// The elementary cycles inside one strongly connected component (sorted), each starting at its
/// smallest node; at most [`MAX_CYCLES`].
fn elementary_cycles(adj: &[Vec<usize>], scc: &[usize]) -> Vec<Vec<usize>> {
    fn walk(
        adj: &[Vec<usize>],
        scc: &[usize],
        start: usize,
        path: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        let v = *path.last().expect("a path has a start");
        for &w in &adj[v] {
            if out.len() >= MAX_CYCLES {
                return;
            }
            if w == start {
                out.push(path.clone());
            } else if w > start && scc.binary_search(&w).is_ok() && !path.contains(&w) {
                path.push(w);
                walk(adj, scc, start, path, out);
                path.pop();
            }
        }
    }
    let mut out = Vec::new();
    for &start in scc {
        walk(adj, scc, start, &mut vec![start], &mut out);
    }
    out
}

/// What one file declares and names, for the graph.
#[derive(Debug, Default, PartialEq)]
struct Scan {
    /// `mod x;` declarations.
    mods: Vec<ModDecl>,
    /// Inline `mod x { ... }` blocks, as module paths inside the file.
    inline: Vec<Vec<String>>,
    /// Paths starting with `crate`, `super` or `self`.
    refs: Vec<PathRef>,
}

/// A `mod x;` declaration.
#[derive(Debug, PartialEq)]
struct ModDecl {
    /// The inline modules around it.
    ctx: Vec<String>,
    name: String,
    /// Its `#[path = "..."]`.
    path: Option<String>,
    line: u32,
}

/// A path naming an item through `crate`, `super` or `self`.
#[derive(Debug, PartialEq)]
struct PathRef {
    /// The inline modules around it.
    ctx: Vec<String>,
    /// Its segments, `crate` / `super` / `self` first; a trailing `self` of a `use` is dropped.
    segs: Vec<String>,
    /// The line of its last segment.
    line: u32,
    /// Part of a `#[doc(no_inline)] pub use` whose name the file does not use itself: a
    /// compatibility alias, not an edge.
    alias: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// `::`
    Sep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: u32,
}

/// Splits Rust source into identifiers, string literals, `::` and punctuation, dropping comments
/// (doc comments included), numbers, character literals and lifetimes.
fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |j: usize| c.get(j).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1u32);
    // The contents of a string whose opening quote is at `i` - 1, and the index after it.
    let string = |mut i: usize, line: &mut u32| {
        let start = i;
        while i < c.len() && c[i] != '"' {
            if c[i] == '\\' {
                i += 1;
            }
            if at(i) == '\n' {
                *line += 1;
            }
            i += 1;
        }
        (c[start..i.min(c.len())].iter().collect::<String>(), i + 1)
    };
    while i < c.len() {
        let ch = c[i];
        let l = line;
        match ch {
            '\n' => {
                line += 1;
                i += 1;
            }
            _ if ch.is_whitespace() => i += 1,
            '/' if at(i + 1) == '/' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == '*' => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            '"' => {
                let (s, next) = string(i + 1, &mut line);
                out.push(Token {
                    tok: Tok::Str(s),
                    line: l,
                });
                i = next;
            }
            '\'' => {
                if at(i + 1) == '\\' {
                    // '\n', '\'', '\u{..}'
                    i += 3;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == '\'' {
                    i += 3;
                } else {
                    // A lifetime or a label: its name lexes as an identifier, harmlessly.
                    i += 1;
                }
            }
            _ if ch.is_alphabetic() || ch == '_' => {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                match word.as_str() {
                    "r" | "br" | "cr" if at(i + hashes) == '"' => {
                        // A raw string: up to a quote followed by as many hashes.
                        let mut j = i + hashes + 1;
                        let body = j;
                        while j < c.len()
                            && !(c[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#'))
                        {
                            if c[j] == '\n' {
                                line += 1;
                            }
                            j += 1;
                        }
                        out.push(Token {
                            tok: Tok::Str(c[body..j.min(c.len())].iter().collect()),
                            line: l,
                        });
                        i = j + 1 + hashes;
                    }
                    "r" if hashes == 1 => {
                        // A raw identifier, `r#type`.
                        i += 1;
                        let start = i;
                        while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                            i += 1;
                        }
                        out.push(Token {
                            tok: Tok::Ident(c[start..i].iter().collect()),
                            line: l,
                        });
                    }
                    "b" | "c" if at(i) == '"' => {
                        let (s, next) = string(i + 1, &mut line);
                        out.push(Token {
                            tok: Tok::Str(s),
                            line: l,
                        });
                        i = next;
                    }
                    // A byte literal `b'x'`: the quote lexes next as a character literal.
                    "b" if at(i) == '\'' => {}
                    _ => out.push(Token {
                        tok: Tok::Ident(word),
                        line: l,
                    }),
                }
            }
            _ if ch.is_ascii_digit() => {
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
            ':' if at(i + 1) == ':' => {
                out.push(Token {
                    tok: Tok::Sep,
                    line,
                });
                i += 2;
            }
            _ => {
                out.push(Token {
                    tok: Tok::Punct(ch),
                    line,
                });
                i += 1;
            }
        }
    }
    out
}

fn is_ident(t: Option<&Token>, word: &str) -> bool {
    matches!(t, Some(Token { tok: Tok::Ident(w), .. }) if w == word)
}

fn is_punct(t: Option<&Token>, p: char) -> bool {
    matches!(t, Some(Token { tok: Tok::Punct(q), .. }) if *q == p)
}

/// The index of the bracket closing the one at `open`.
fn closing(t: &[Token], open: usize) -> usize {
    let (o, c) = match &t[open].tok {
        Tok::Punct('(') => ('(', ')'),
        Tok::Punct('[') => ('[', ']'),
        _ => ('{', '}'),
    };
    let mut depth = 0usize;
    for (k, tok) in t.iter().enumerate().skip(open) {
        match tok.tok {
            Tok::Punct(p) if p == o => depth += 1,
            Tok::Punct(p) if p == c => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    t.len()
}

/// Reads one file's module declarations and the paths it names.
fn scan(src: &str) -> Scan {
    let t = lex(src);
    let mut s = Scan::default();
    // The inline modules around the cursor, with the brace depth inside each.
    let mut ctx: Vec<(String, usize)> = Vec::new();
    let names = |ctx: &[(String, usize)]| ctx.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let mut depth = 0;
    // The outer attributes read since the last item began: `#[doc(no_inline)]`, `#[path]`.
    let (mut no_inline, mut path_attr) = (false, None::<String>);
    // The aliases (index in `refs`, the name each binds) and the tokens of their `use` items.
    let (mut aliases, mut alias_spans) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < t.len() {
        let tok = &t[i];
        match &tok.tok {
            Tok::Punct('#') => {
                let inner = is_punct(t.get(i + 1), '!');
                let open = i + 1 + usize::from(inner);
                if !is_punct(t.get(open), '[') {
                    i += 1;
                    continue;
                }
                let end = closing(&t, open);
                let body = &t[open + 1..end.min(t.len())];
                // Paths in attributes count (`#[arg(value_parser = crate::parse_size)]`).
                let mut k = 0;
                while k < body.len() {
                    match inline_path(body, k) {
                        Some((segs, next)) => {
                            s.refs.push(path_ref(&ctx, segs, false));
                            k = next;
                        }
                        None => k += 1,
                    }
                }
                if !inner {
                    let words: Vec<&Tok> = body.iter().map(|b| &b.tok).collect();
                    let ident = |w: &str| Tok::Ident(w.into());
                    if words
                        == [
                            &ident("doc"),
                            &Tok::Punct('('),
                            &ident("no_inline"),
                            &Tok::Punct(')'),
                        ]
                    {
                        no_inline = true;
                    }
                    if let [Tok::Ident(p), Tok::Punct('='), Tok::Str(v)] = &words[..]
                        && p == "path"
                    {
                        path_attr = Some(v.clone());
                    }
                }
                i = end + 1;
                continue;
            }
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if ctx.last().is_some_and(|(_, d)| *d == depth) {
                    ctx.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(w) if w == "pub" || w == "use" || w == "mod" => {
                let public = w == "pub";
                let mut j = i;
                if public {
                    j += 1;
                    if is_punct(t.get(j), '(') {
                        // `pub(crate)`, `pub(in crate::a)`: a visibility, not a path.
                        j = closing(&t, j) + 1;
                    }
                }
                if is_ident(t.get(j), "use") {
                    let mut paths = Vec::new();
                    let alias = public && no_inline;
                    let start = i;
                    i = use_tree(&t, j + 1, &mut Vec::new(), &mut paths);
                    for (mut p, name) in paths {
                        if p.len() > 1 && p.last().is_some_and(|(s, _)| s == "self") {
                            p.pop();
                        }
                        if !matches!(p[0].0.as_str(), "crate" | "super" | "self") {
                            continue;
                        }
                        s.refs.push(path_ref(&ctx, p, alias));
                        if alias {
                            aliases.push((s.refs.len() - 1, name));
                        }
                    }
                    if alias {
                        alias_spans.push(start..i);
                    }
                } else if is_ident(t.get(j), "mod") {
                    if let Some(Token {
                        tok: Tok::Ident(name),
                        line,
                    }) = t.get(j + 1)
                    {
                        if is_punct(t.get(j + 2), ';') {
                            s.mods.push(ModDecl {
                                ctx: names(&ctx),
                                name: name.clone(),
                                path: path_attr.take(),
                                line: *line,
                            });
                        } else if is_punct(t.get(j + 2), '{') {
                            depth += 1;
                            ctx.push((name.clone(), depth));
                            s.inline.push(names(&ctx));
                        }
                    }
                    i = j + 3;
                } else {
                    i = j;
                }
                no_inline = false;
                path_attr = None;
                continue;
            }
            Tok::Ident(_) if inline_path(&t, i).is_some() => {
                let (segs, next) = inline_path(&t, i).expect("just matched");
                s.refs.push(path_ref(&ctx, segs, false));
                i = next;
                no_inline = false;
                path_attr = None;
                continue;
            }
            _ => {}
        }
        no_inline = false;
        path_attr = None;
        i += 1;
    }
    // An alias whose name the file also uses is the file's own import too: an edge after all.
    for (r, name) in aliases {
        let used = name.is_some_and(|n| {
            t.iter().enumerate().any(|(k, tok)| {
                tok.tok == Tok::Ident(n.clone()) && !alias_spans.iter().any(|sp| sp.contains(&k))
            })
        });
        if used {
            s.refs[r].alias = false;
        }
    }
    s
}

/// The path at `i` if it starts an inline path, `crate::a::f()`, `super::x::Y` (not
/// `$crate::`, which names wherever a macro expands), and the index after it.
fn inline_path(t: &[Token], i: usize) -> Option<(Vec<(String, u32)>, usize)> {
    let Tok::Ident(w) = &t.get(i)?.tok else {
        return None;
    };
    if !matches!(w.as_str(), "crate" | "super" | "self")
        || t.get(i + 1)?.tok != Tok::Sep
        || (i > 0 && is_punct(t.get(i - 1), '$'))
    {
        return None;
    }
    let mut segs = vec![(w.clone(), t[i].line)];
    let mut j = i + 1;
    while t.get(j).is_some_and(|n| n.tok == Tok::Sep) {
        match t.get(j + 1) {
            Some(Token {
                tok: Tok::Ident(n),
                line,
            }) => segs.push((n.clone(), *line)),
            _ => break,
        }
        j += 2;
    }
    Some((segs, j))
}

/// A [`PathRef`] for `segs` (at least one) inside the inline modules `ctx`.
fn path_ref(ctx: &[(String, usize)], segs: Vec<(String, u32)>, alias: bool) -> PathRef {
    PathRef {
        ctx: ctx.iter().map(|(n, _)| n.clone()).collect(),
        line: segs.last().map_or(0, |(_, l)| *l),
        segs: segs.into_iter().map(|(s, _)| s).collect(),
        alias,
    }
}

/// A path of a use tree (segments with their lines) and the name it binds (`None` for a glob).
type UsePath = (Vec<(String, u32)>, Option<String>);

/// Reads the use tree at `i` under `prefix`, pushing every full path (a glob is its prefix);
/// returns the index after the tree.
fn use_tree(
    t: &[Token],
    mut i: usize,
    prefix: &mut Vec<(String, u32)>,
    out: &mut Vec<UsePath>,
) -> usize {
    let base = prefix.len();
    if base == 0 && t.get(i).is_some_and(|n| n.tok == Tok::Sep) {
        // `use ::std::x`: an extern crate.
        prefix.push(("::".into(), t[i].line));
        i += 1;
    }
    while let Some(tok) = t.get(i) {
        match &tok.tok {
            Tok::Ident(w) => {
                prefix.push((w.clone(), tok.line));
                i += 1;
                if t.get(i).is_some_and(|n| n.tok == Tok::Sep) {
                    i += 1;
                    continue;
                }
                let mut name = w.clone();
                if is_ident(t.get(i), "as") {
                    if let Some(Token {
                        tok: Tok::Ident(n), ..
                    }) = t.get(i + 1)
                    {
                        name = n.clone();
                    }
                    i += 2;
                }
                if name == "self" && prefix.len() > 1 {
                    name = prefix[prefix.len() - 2].0.clone();
                }
                out.push((prefix.clone(), Some(name)));
                break;
            }
            Tok::Punct('*') => {
                i += 1;
                if !prefix.is_empty() {
                    out.push((prefix.clone(), None));
                }
                break;
            }
            Tok::Punct('{') => {
                i += 1;
                while let Some(n) = t.get(i) {
                    match n.tok {
                        Tok::Punct('}') => {
                            i += 1;
                            break;
                        }
                        Tok::Punct(',') => i += 1,
                        _ => {
                            let next = use_tree(t, i, prefix, out);
                            i = if next > i { next } else { i + 1 };
                        }
                    }
                }
                break;
            }
            _ => break,
        }
    }
    prefix.truncate(base);
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(src: &str) -> Vec<(String, u32, bool)> {
        scan(src)
            .refs
            .into_iter()
            .map(|r| {
                let mut p = r.ctx.join("/");
                if !p.is_empty() {
                    p += ": ";
                }
                (p + &r.segs.join("::"), r.line, r.alias)
            })
            .collect()
    }

    fn paths(src: &str) -> Vec<String> {
        refs(src).into_iter().map(|(p, _, _)| p).collect()
    }

    #[test]
    fn use_trees_with_nested_braces() {
        let src = "use crate::{a::X, b::{self, Y, z::Z as W}};\nuse std::io::{self, Read};\n\
                   pub(crate) use super::c::*;\nuse engine::Source;\n";
        assert_eq!(
            paths(src),
            [
                "crate::a::X",
                "crate::b",
                "crate::b::Y",
                "crate::b::z::Z",
                "super::c"
            ]
        );
    }

    #[test]
    fn super_super_self_and_lines() {
        let src = "use super::super::x::Y;\nuse self::inner::{\n    A,\n    B,\n};\n";
        assert_eq!(
            refs(src),
            [
                ("super::super::x::Y".to_string(), 1, false),
                ("self::inner::A".to_string(), 3, false),
                ("self::inner::B".to_string(), 4, false),
            ]
        );
    }

    #[test]
    fn inline_paths_in_code_and_types() {
        let src = "fn f(x: crate::a::T) -> Result<(), super::Error> {\n\
                   crate::b::g(self.x, Self::K)?; self::h(); $crate::m::n(); Ok(())\n}\n\
                   pub(in crate::a) struct S;\n\
                   #[arg(long, value_parser = crate::args::parse_size)]\n";
        assert_eq!(
            paths(src),
            [
                "crate::a::T",
                "super::Error",
                "crate::b::g",
                "self::h",
                "crate::args::parse_size"
            ]
        );
    }

    #[test]
    fn comments_doc_comments_strings_and_chars_are_skipped() {
        let src = r###"
            // use crate::a::X;
            /// See [`crate::b::Y`].
            //! crate::c::Z
            /* use crate::d::W; /* nested crate::e::V */ still crate::f::U */
            const S: &str = "crate::g::T \" crate::h::S";
            const R: &str = r#"crate::i::R " crate::j::Q"#;
            const B: &[u8] = b"crate::k::P";
            const C: char = '"'; const D: char = '\''; const E: u8 = b'"';
            fn f<'a>(x: &'a str) -> &'a str { crate::real::it(x) }
        "###;
        assert_eq!(paths(src), ["crate::real::it"]);
    }

    #[test]
    fn inline_modules_give_context_and_mod_declarations_are_not_paths() {
        let src = "mod a;\n#[path = \"other.rs\"]\npub mod b;\n\
                   #[cfg(test)]\nmod tests {\n    use super::*;\n    mod deep { use super::super::X; }\n}\n\
                   fn after() { crate::z(); }\n";
        let s = scan(src);
        assert_eq!(
            s.mods,
            [
                ModDecl {
                    ctx: vec![],
                    name: "a".into(),
                    path: None,
                    line: 1
                },
                ModDecl {
                    ctx: vec![],
                    name: "b".into(),
                    path: Some("other.rs".into()),
                    line: 3
                },
            ]
        );
        assert_eq!(s.inline, [vec!["tests"], vec!["tests", "deep"]]);
        assert_eq!(
            paths(src),
            ["tests: super", "tests/deep: super::super::X", "crate::z"]
        );
    }

    #[test]
    fn a_doc_no_inline_pub_use_is_an_alias() {
        let src = "#[doc(no_inline)]\npub use crate::old::{A, B};\n\
                   #[doc(no_inline)]\nuse crate::private::C;\n\
                   #[doc(hidden)]\npub use crate::hidden::D;\n\
                   #[cfg(feature = \"x\")]\n#[doc(no_inline)]\npub use super::E;\n\
                   #[doc(no_inline)]\npub use crate::moved::{F, G as H, module::{self}};\n\
                   fn f(f: F, h: H) -> module::X { loop {} }\n";
        assert_eq!(
            refs(src),
            [
                ("crate::old::A".to_string(), 2, true),
                ("crate::old::B".to_string(), 2, true),
                ("crate::private::C".to_string(), 4, false),
                ("crate::hidden::D".to_string(), 6, false),
                ("super::E".to_string(), 9, true),
                // Used by the file itself: its import as well, so an edge.
                ("crate::moved::F".to_string(), 11, false),
                ("crate::moved::G".to_string(), 11, false),
                ("crate::moved::module".to_string(), 11, false),
            ]
        );
    }

    #[test]
    fn paths_resolve_to_the_longest_module_prefix() {
        let v = |s: &str| -> Vec<String> {
            s.split("::")
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        let modules: HashMap<Vec<String>, usize> = [
            (v(""), 0),
            (v("engine"), 1),
            (v("engine::source"), 2),
            (v("engine::source::tests"), 2),
        ]
        .into();
        let r = |here: &str, path: &str| resolve(&modules, &v(here), &v(path));
        assert_eq!(r("engine", "crate::engine::source::Source"), Some(2));
        assert_eq!(r("engine::source", "crate::Error"), Some(0));
        assert_eq!(r("engine::source::tests", "super::Source"), Some(2));
        assert_eq!(r("engine::source::tests", "super::super::X"), Some(1));
        assert_eq!(r("engine", "self::source::f"), Some(2));
        assert_eq!(r("engine::source", "self::super::X"), Some(1));
        assert_eq!(r("", "super::X"), None);
    }

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cycle")
    }

    #[test]
    fn the_fixture_cycle_is_reported_and_its_alias_is_not() {
        let r = check(&crate_at(&fixture()).unwrap()).unwrap();
        assert_eq!(r.cycles.len(), 1, "{:?}", r.cycles);
        let c = &r.cycles[0];
        assert!(c.ends_with(": src/a.rs:3 -> src/b.rs:4 -> src/a.rs"), "{c}");
        assert_eq!(r.aliases, ["src/b.rs:8 crate::a::Alpha"]);
        assert_eq!(r.modules, 3);
    }

    #[test]
    fn the_fixture_without_the_import_passes() {
        let dir = std::env::temp_dir().join(format!("xtask-cycles-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        for f in ["lib.rs", "a.rs", "b.rs"] {
            let src = std::fs::read_to_string(fixture().join("src").join(f)).unwrap();
            let src = src.replace("use super::a::Alpha;", "");
            std::fs::write(dir.join("src").join(f), src).unwrap();
        }
        let r = check(&crate_at(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        let r = r.unwrap();
        assert_eq!(r.cycles, Vec::<String>::new());
        assert_eq!(r.aliases.len(), 1, "the alias is still there");
    }
}
