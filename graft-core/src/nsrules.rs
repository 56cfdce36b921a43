//! A network namespace's own mapping rules, as graftd keeps them.
//!
//! An administrator (or graft-cni, for a Kubernetes pod) gives graftd the
//! ingress, egress and exclusion rules of a namespace once, in the syntax of
//! the launcher's `-i`, `-e` and `-x`; `graft -- CMD` without any of those
//! flags then asks the namespace's broker for them, so a pod's command only
//! needs the `graft --` prefix.
//!
//! On the control socket the rules travel as JSON lists of strings; graftd
//! parses them with [`crate::rules`] and keeps them in canonical form. On the
//! broker they travel as a *blob* in a sealed memfd (the broker's fixed-size
//! reply has no room for them): three lines, `INGRESS\nEGRESS\nEXCLUDE\n`,
//! each the rules of one list in canonical form separated by single spaces.
//! [`NsRules::from_blob`] accepts exactly what [`NsRules::to_blob`] produces.

use serde::{Deserialize, Serialize};

use crate::rules::{EgressRule, IngressRule, RuleError, RuleSet};

/// Most rules one list (ingress, egress or exclude) may hold.
pub const MAX_RULES_PER_LIST: usize = 64;
/// Largest blob (64 rules of the longest form, three lists, fit easily).
pub const MAX_BLOB: usize = 16 * 1024;

/// Why a namespace's rules are not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsRulesError {
    #[error("{list} rule {err}")]
    Rule { list: &'static str, err: RuleError },
    #[error("{n} {list} rules (at most {MAX_RULES_PER_LIST})")]
    TooMany { list: &'static str, n: usize },
    #[error("rules blob: {0}")]
    Blob(&'static str),
}

/// The three rule lists of a namespace, each rule as the launcher's flag
/// takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsRules {
    /// `-i ADDR:PORT[-PORT]=EP` rules.
    #[serde(default)]
    pub ingress: Vec<String>,
    /// `-e PREFIX/LEN=EP` rules.
    #[serde(default)]
    pub egress: Vec<String>,
    /// `-x PREFIX/LEN` exclusions.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Parses each rule of one list; the first bad one is the error.
fn parse_list<T>(
    list: &'static str,
    v: &[String],
    f: impl Fn(&str) -> Result<T, RuleError>,
) -> Result<Vec<T>, NsRulesError> {
    v.iter()
        .map(|r| f(r).map_err(|err| NsRulesError::Rule { list, err }))
        .collect()
}

impl NsRules {
    /// Whether no list holds a rule (setting such rules clears them).
    pub fn is_empty(&self) -> bool {
        self.ingress.is_empty() && self.egress.is_empty() && self.exclude.is_empty()
    }

    /// Parses every rule; the first bad one is the error.
    pub fn parse(&self) -> Result<RuleSet, NsRulesError> {
        for (list, v) in [
            ("ingress", &self.ingress),
            ("egress", &self.egress),
            ("exclude", &self.exclude),
        ] {
            if v.len() > MAX_RULES_PER_LIST {
                return Err(NsRulesError::TooMany { list, n: v.len() });
            }
        }
        let ingress = parse_list("ingress", &self.ingress, str::parse::<IngressRule>)?;
        let mut egress = parse_list("egress", &self.egress, str::parse::<EgressRule>)?;
        egress.extend(parse_list(
            "exclude",
            &self.exclude,
            EgressRule::parse_exclude,
        )?);
        Ok(RuleSet { ingress, egress })
    }

    /// The same rules as the rules module prints them (`:::80=ep` becomes
    /// `[::]:80=ep`), after checking each.
    pub fn canonical(&self) -> Result<NsRules, NsRulesError> {
        let set = self.parse()?;
        let egress = |exclusions: bool| {
            let it = set.egress.iter();
            it.filter(|r| r.endpoint.is_none() == exclusions)
                .map(|r| r.to_string())
                .collect()
        };
        Ok(NsRules {
            ingress: set.ingress.iter().map(|r| r.to_string()).collect(),
            egress: egress(false),
            exclude: egress(true),
        })
    }

    /// The broker's form: three `\n`-terminated lines of space-separated
    /// rules. Meant for canonical rules (graftd stores only those).
    pub fn to_blob(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [&self.ingress, &self.egress, &self.exclude] {
            b.extend_from_slice(v.join(" ").as_bytes());
            b.push(b'\n');
        }
        b
    }

    /// Decodes a blob strictly: size, UTF-8, exactly three lines, every rule
    /// valid, and the whole equal to what [`NsRules::to_blob`] makes of the
    /// canonical rules (no stray spaces, no alternative spellings).
    pub fn from_blob(b: &[u8]) -> Result<NsRules, NsRulesError> {
        if b.len() > MAX_BLOB {
            return Err(NsRulesError::Blob("larger than 16 KiB"));
        }
        let text = std::str::from_utf8(b).map_err(|_| NsRulesError::Blob("not UTF-8"))?;
        let body = text
            .strip_suffix('\n')
            .ok_or(NsRulesError::Blob("does not end with a newline"))?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [i, e, x] = lines[..] else {
            return Err(NsRulesError::Blob("not three lines"));
        };
        let words = |l: &str| -> Vec<String> {
            l.split(' ')
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let rules = NsRules {
            ingress: words(i),
            egress: words(e),
            exclude: words(x),
        }
        .canonical()?;
        if rules.to_blob() != b {
            return Err(NsRulesError::Blob("not in canonical form"));
        }
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(i: &[&str], e: &[&str], x: &[&str]) -> NsRules {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        NsRules {
            ingress: v(i),
            egress: v(e),
            exclude: v(x),
        }
    }

    #[test]
    fn canonical_and_blob_round_trip() {
        let raw = r(
            &[":::80=ep-in6", "0.0.0.0:8000-8080=ep-in4"],
            &["0.0.0.0/0=ep-out4"],
            &["10.0.0.0/8"],
        );
        let c = raw.canonical().unwrap();
        assert_eq!(
            c.ingress,
            vec!["[::]:80=ep-in6", "0.0.0.0:8000-8080=ep-in4"]
        );
        let blob = c.to_blob();
        assert_eq!(
            blob,
            b"[::]:80=ep-in6 0.0.0.0:8000-8080=ep-in4\n0.0.0.0/0=ep-out4\n10.0.0.0/8\n"
        );
        assert_eq!(NsRules::from_blob(&blob).unwrap(), c);
        assert_eq!(NsRules::from_blob(b"\n\n\n").unwrap(), NsRules::default());
    }

    #[test]
    fn strict_blob() {
        for bad in [
            &b"\n\n"[..],
            b"\n\n\n\n",
            b"\n\n",
            b"  \n\n\n",
            b":::80=e\n\n\n",
            b"0.0.0.0:80=e\n\n10.0.0.1/8\n",
            b"0.0.0.0:80=e \n\n\n",
            b"\n\n\n ",
            b"\xff\n\n\n",
        ] {
            assert!(NsRules::from_blob(bad).is_err(), "{bad:?}");
        }
        assert!(NsRules::from_blob(&vec![b'\n'; MAX_BLOB + 1]).is_err());
    }

    #[test]
    fn bad_rules_name_their_list() {
        assert_eq!(
            r(&[], &["10.0.0.0/8"], &[])
                .parse()
                .unwrap_err()
                .to_string(),
            "egress rule \"10.0.0.0/8\": expected PREFIX/LEN=ENDPOINT"
        );
        let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
        let e = NsRules {
            exclude: many,
            ..NsRules::default()
        };
        assert_eq!(
            e.parse().unwrap_err().to_string(),
            "65 exclude rules (at most 64)"
        );
    }
}
