//! `ip graft rules [ show ]`, `ip graft rules set [ ingress RULE ]...
//! [ egress RULE ]... [ exclude PREFIX/LEN ]...` and `ip graft rules flush`:
//! the mapping rules graftd keeps for the namespace the command runs in,
//! which `graft -- CMD` (without `-i/-e/-x`) takes from the broker.

use std::os::fd::AsFd;
use std::path::Path;

use graft_core::nsrules::NsRules;
use graft_core::proto::control::Request;

use crate::args::{matches, usage, GlobalOpts, Usage};
use crate::{client, netns};

/// A parsed `rules` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesCmd {
    Show,
    /// Replace the rules (`flush` is `Set` with none).
    Set(NsRules),
}

/// Parses the words after `rules`.
pub fn parse(args: &[String]) -> Result<RulesCmd, Usage> {
    let Some((word, rest)) = args.split_first() else {
        return Ok(RulesCmd::Show);
    };
    let w = word.as_str();
    if matches(w, "show") || matches(w, "list") {
        if let Some(extra) = rest.first() {
            return Err(usage!(
                "Error: invalid argument \"{extra}\"; try \"ip graft help\"."
            ));
        }
        return Ok(RulesCmd::Show);
    }
    if matches(w, "flush") {
        if let Some(extra) = rest.first() {
            return Err(usage!(
                "Error: invalid argument \"{extra}\"; try \"ip graft help\"."
            ));
        }
        return Ok(RulesCmd::Set(NsRules::default()));
    }
    if !matches(w, "set") {
        return Err(usage!(
            "Error: \"{w}\" is unknown: ip graft rules {{ show | set ... | flush }}"
        ));
    }
    let mut rules = NsRules::default();
    let mut it = rest.iter();
    while let Some(kw) = it.next() {
        let (list, grammar) = if matches(kw, "ingress") {
            (&mut rules.ingress, "ingress ADDR:PORT[-PORT]=NAME")
        } else if matches(kw, "egress") {
            (&mut rules.egress, "egress PREFIX/LEN=NAME")
        } else if matches(kw, "exclude") {
            (&mut rules.exclude, "exclude PREFIX/LEN")
        } else {
            return Err(usage!(
                "Error: invalid argument \"{kw}\"; try \"ip graft help\"."
            ));
        };
        let Some(v) = it.next() else {
            return Err(usage!("Error: \"{kw}\" needs an argument: {grammar}"));
        };
        list.push(v.clone());
    }
    if rules.is_empty() {
        return Err(usage!(
            "Error: \"set\" needs at least one rule (\"ip graft rules flush\" clears them)"
        ));
    }
    rules.parse().map_err(|e| usage!("Error: {e}"))?;
    Ok(RulesCmd::Set(rules))
}

/// The rules as `show` prints them: one `KIND RULE` line each.
pub fn format(rules: &NsRules, opts: &GlobalOpts) -> String {
    if opts.json {
        let mut s = if opts.pretty {
            serde_json::to_string_pretty(rules).unwrap_or_default()
        } else {
            serde_json::to_string(rules).unwrap_or_default()
        };
        s.push('\n');
        return s;
    }
    let mut out = String::new();
    for (kind, list) in [
        ("ingress", &rules.ingress),
        ("egress", &rules.egress),
        ("exclude", &rules.exclude),
    ] {
        for r in list {
            out.push_str(kind);
            out.push(' ');
            out.push_str(r);
            out.push('\n');
        }
    }
    out
}

pub fn run(cmd: RulesCmd, opts: &GlobalOpts, control: &Path) -> anyhow::Result<String> {
    let me = netns::open_self()
        .map_err(|e| anyhow::anyhow!("cannot open /proc/self/ns/net: {}", netns::desc(&e)))?;
    match cmd {
        RulesCmd::Show => {
            let a = client::call(control, &Request::GetRules {}, &[me.as_fd()])?;
            Ok(format(&a.rules.unwrap_or_default(), opts))
        }
        RulesCmd::Set(rules) => {
            client::call(control, &Request::SetRules { rules }, &[me.as_fd()])?;
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<RulesCmd, String> {
        let v: Vec<String> = s.split_whitespace().map(str::to_owned).collect();
        parse(&v).map_err(|e| e.0)
    }

    #[test]
    fn grammar() {
        assert_eq!(p("").unwrap(), RulesCmd::Show);
        assert_eq!(p("sh").unwrap(), RulesCmd::Show);
        assert_eq!(p("flush").unwrap(), RulesCmd::Set(NsRules::default()));
        let RulesCmd::Set(r) =
            p("set in 0.0.0.0:80=ep e 0.0.0.0/0=out ex 10.0.0.0/8 in :::80=ep").unwrap()
        else {
            panic!()
        };
        assert_eq!(r.ingress, ["0.0.0.0:80=ep", ":::80=ep"]);
        assert_eq!(r.egress, ["0.0.0.0/0=out"]);
        assert_eq!(r.exclude, ["10.0.0.0/8"]);
        for (line, want) in [
            (
                "set ingress 0.0.0.0=ep",
                "Error: ingress rule \"0.0.0.0=ep\": expected ADDR:PORT[-PORT]=ENDPOINT",
            ),
            (
                "set egress",
                "Error: \"egress\" needs an argument: egress PREFIX/LEN=NAME",
            ),
            (
                "set",
                "Error: \"set\" needs at least one rule (\"ip graft rules flush\" clears them)",
            ),
            (
                "frob",
                "Error: \"frob\" is unknown: ip graft rules { show | set ... | flush }",
            ),
            (
                "flush x",
                "Error: invalid argument \"x\"; try \"ip graft help\".",
            ),
        ] {
            assert_eq!(p(line).unwrap_err(), want, "{line}");
        }
    }

    #[test]
    fn show_format() {
        let r = NsRules {
            ingress: vec!["0.0.0.0:80=ep".into()],
            egress: vec![],
            exclude: vec!["10.0.0.0/8".into()],
        };
        assert_eq!(
            format(&r, &GlobalOpts::default()),
            "ingress 0.0.0.0:80=ep\nexclude 10.0.0.0/8\n"
        );
        let j = GlobalOpts {
            json: true,
            ..GlobalOpts::default()
        };
        assert_eq!(
            format(&r, &j),
            "{\"ingress\":[\"0.0.0.0:80=ep\"],\"egress\":[],\"exclude\":[\"10.0.0.0/8\"]}\n"
        );
    }
}
