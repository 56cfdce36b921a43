//! Global options (`ip [ OPTIONS ] graft …`) and the small vocabulary every
//! subcommand parser shares: iproute2's prefix matching and the usage error.

use std::fmt;

/// A command-line mistake: printed as one line, exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Builds a [`Usage`] error from format arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __iproute_graft_usage {
    ($($t:tt)*) => { $crate::args::Usage(format!($($t)*)) };
}
pub use crate::__iproute_graft_usage as usage;

/// iproute2's `matches()`: `word` is a non-empty prefix of `full`.
pub fn matches(word: &str, full: &str) -> bool {
    !word.is_empty() && full.starts_with(word)
}

/// Options that come before the object, as iproute2 spells them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalOpts {
    /// `-j`: JSON output.
    pub json: bool,
    /// `-p`: pretty-printed JSON.
    pub pretty: bool,
    /// `-s` (repeatable): counters.
    pub stats: u8,
    /// `-h`: human-readable byte counts.
    pub human: bool,
    /// `-d`: details (the target namespace's identity).
    pub details: bool,
    /// `-n NETNS`: run as if inside that namespace (`ip -n NETNS …`).
    pub netns: Option<String>,
    /// `-V`: print the version and exit.
    pub version: bool,
    /// `-help`: print the help and exit.
    pub help: bool,
}

/// Splits `args` (everything after the program name) into global options and
/// the rest. One `graft` object word (or an abbreviation of it) among the
/// options is skipped, so `ip-graft -j show`, the wrapper's
/// `ip-graft -j graft show` and `ip-graft graft -j show` all work.
pub fn parse_global(args: &[String]) -> Result<(GlobalOpts, &[String]), Usage> {
    let mut o = GlobalOpts::default();
    let mut i = 0;
    let mut object_seen = false;
    while i < args.len() {
        let raw = args[i].as_str();
        if !raw.starts_with('-') {
            // Options may also follow the object word (`ip graft -j show`),
            // which iproute2 itself would refuse; accepting it costs nothing.
            if !object_seen && matches(raw, "graft") {
                object_seen = true;
                i += 1;
                continue;
            }
            break;
        }
        // iproute2 accepts `--json` as well as `-json`.
        let opt = if raw.starts_with("--") {
            &raw[1..]
        } else {
            raw
        };
        if opt.len() < 2 {
            return Err(usage!(
                "Option \"{raw}\" is unknown, try \"ip graft help\"."
            ));
        }
        if matches(opt, "-json") {
            o.json = true;
        } else if matches(opt, "-pretty") {
            o.pretty = true;
        } else if matches(opt, "-stats") || matches(opt, "-statistics") {
            o.stats = o.stats.saturating_add(1);
        } else if matches(opt, "-human") || matches(opt, "-human-readable") {
            o.human = true;
        } else if matches(opt, "-details") {
            o.details = true;
        } else if matches(opt, "-netns") {
            i += 1;
            let v = args
                .get(i)
                .ok_or_else(|| usage!("Error: option \"{raw}\" needs a namespace name"))?;
            o.netns = Some(v.clone());
        } else if matches(opt, "-Version") {
            o.version = true;
        } else if matches(opt, "-help") {
            o.help = true;
        } else {
            return Err(usage!(
                "Option \"{raw}\" is unknown, try \"ip graft help\"."
            ));
        }
        i += 1;
    }
    Ok((o, &args[i..]))
}

/// Test helper: runs a subcommand's parser on a command line as typed
/// (split on blanks); the usage text on error. Public (and hidden) because
/// the `ip-graft` binary's unit tests use it through the library.
#[doc(hidden)]
pub fn parse_typed<T>(
    parse: impl Fn(&[String]) -> Result<T, Usage>,
    line: &str,
) -> Result<T, String> {
    let v: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    parse(&v).map_err(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_then_optional_object() {
        let a = v("-s -j graft show");
        let (o, rest) = parse_global(&a).unwrap();
        assert!(o.json && o.stats == 1 && !o.pretty);
        assert_eq!(rest, &v("show")[..]);

        let a = v("-j show");
        let (o, rest) = parse_global(&a).unwrap();
        assert!(o.json);
        assert_eq!(rest, &v("show")[..]);

        let a = v("gr add x");
        let (_, rest) = parse_global(&a).unwrap();
        assert_eq!(rest, &v("add x")[..]);

        let a = v("-s graft -j show graft");
        let (o, rest) = parse_global(&a).unwrap();
        assert!(o.json && o.stats == 1);
        assert_eq!(rest, &v("show graft")[..]);

        // Only one object word: a second one is a (bad) command.
        let a = v("graft graft");
        assert_eq!(parse_global(&a).unwrap().1, &v("graft")[..]);

        let a = v("-json -pretty -statistics -s --human -d");
        let (o, rest) = parse_global(&a).unwrap();
        assert!(o.json && o.pretty && o.human && o.details);
        assert_eq!(o.stats, 2);
        assert!(rest.is_empty());
    }

    #[test]
    fn netns_option() {
        let a = v("-n c1 graft show");
        let (o, rest) = parse_global(&a).unwrap();
        assert_eq!(o.netns.as_deref(), Some("c1"));
        assert_eq!(rest, &v("show")[..]);
        assert_eq!(
            parse_global(&v("-n")).unwrap_err().0,
            "Error: option \"-n\" needs a namespace name"
        );
    }

    #[test]
    fn unknown_option() {
        assert_eq!(
            parse_global(&v("-x show")).unwrap_err().0,
            "Option \"-x\" is unknown, try \"ip graft help\"."
        );
    }

    #[test]
    fn h_is_human_as_in_iproute2() {
        let a = v("-h");
        assert!(parse_global(&a).unwrap().0.human);
        let a = v("-help");
        assert!(parse_global(&a).unwrap().0.help);
    }
}
