//! The command line of `graft`, and the environment it turns into.
//!
//! Options (clap) are read getopt-style up to the first non-option word (or
//! `--`), so `graft iperf3 -s` leaves `-s` to iperf3. Short options may be
//! clustered (`-vn`) and take their value attached or as the next word
//! (`-iADDR`, `-i ADDR`); long forms take `--opt=VALUE` or `--opt VALUE`.
//! Every usage error is one line of graft's own words (exit 2).

use std::ffi::OsString;

use clap::Parser;
use graft_core::rules::{EgressRule, IngressRule, RuleError, RuleSet};

/// One line, printed with usage errors and by `-h`.
pub const USAGE: &str = "usage: graft [-v] [-n|--no-check] [-i ADDR:PORT[-PORT]=EP]... \
[-e PREFIX/LEN=EP]... [-x PREFIX/LEN]... [-g host|app] [--mode auto|preload|seccomp] \
[--wait SECS] [--] COMMAND [ARGS...]";

/// What `getsockname()` reports on an ingress-grafted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetsocknamePolicy {
    /// The host address the socket is really bound to (AF_GRAFT's behaviour).
    Host,
    /// The address the application asked for in `bind()`.
    App,
}

impl GetsocknamePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            GetsocknamePolicy::Host => "host",
            GetsocknamePolicy::App => "app",
        }
    }
}

/// How the program's calls are intercepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Preload for dynamically linked glibc programs, seccomp for the rest.
    Auto,
    /// `LD_PRELOAD` of libgraft-convert only.
    Preload,
    /// A seccomp user-notification filter served by graftd.
    Seccomp,
}

/// A parsed command line that runs a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub verbose: bool,
    /// Whether to check graftd's broker and the endpoints before exec.
    pub check: bool,
    pub ingress: Vec<IngressRule>,
    pub egress: Vec<EgressRule>,
    /// Exclusions (`endpoint: None`).
    pub exclude: Vec<EgressRule>,
    pub getsockname: Option<GetsocknamePolicy>,
    pub mode: Mode,
    /// How long to wait for graftd's broker and the endpoints to appear in
    /// this namespace (a container started before its endpoints are added).
    pub wait_secs: u32,
    /// The program and its arguments; never empty.
    pub command: Vec<OsString>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    Help,
    Version,
}

/// Why the command line is not usable. Every variant is a usage error (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("{0}")]
    Rule(#[from] RuleError),
    #[error("unknown option \"{0}\"")]
    Unknown(String),
    #[error("option \"{0}\" needs a value")]
    MissingValue(String),
    #[error("option \"{0}\" takes no value")]
    UnexpectedValue(String),
    #[error("value of option \"{0}\" is not valid UTF-8")]
    NotUtf8(String),
    #[error("\"{0}\" is not a getsockname policy (host or app)")]
    BadPolicy(String),
    #[error("\"{0}\" is not a mode (auto, preload or seccomp)")]
    BadMode(String),
    #[error("\"{0}\" is not a number of seconds (0-3600)")]
    BadWait(String),
    #[error("no command given")]
    NoCommand,
    #[error("{0}")]
    Usage(String),
    #[error("{var} (from the environment): {err}")]
    Inherited { var: &'static str, err: RuleError },
}

impl ArgsError {
    /// Whether the usage line helps the reader (not for a bad mapping, whose
    /// message already says what is expected).
    pub fn wants_usage(&self) -> bool {
        !matches!(self, ArgsError::Rule(_) | ArgsError::Inherited { .. })
    }
}

/// The command line as clap reads it. Options are read up to the first
/// command word (or `--`); every value is taken as given, even one starting
/// with `-`, as getopt does. `-h` and `--version` are handled here, so
/// they print graft's own usage line and version.
#[derive(Debug, Parser)]
#[command(
    name = "graft",
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true,
    args_override_self = true
)]
struct Cli {
    #[arg(short, long)]
    verbose: bool,
    #[arg(short = 'n', long = "no-check")]
    no_check: bool,
    #[arg(short, long, allow_hyphen_values = true, value_parser = ingress_rule)]
    ingress: Vec<IngressRule>,
    #[arg(short, long, allow_hyphen_values = true, value_parser = egress_rule)]
    egress: Vec<EgressRule>,
    #[arg(short = 'x', long, allow_hyphen_values = true, value_parser = exclusion)]
    exclude: Vec<EgressRule>,
    #[arg(short, long, allow_hyphen_values = true, value_parser = policy)]
    getsockname: Option<GetsocknamePolicy>,
    #[arg(long, allow_hyphen_values = true, value_parser = mode)]
    mode: Option<Mode>,
    #[arg(long, allow_hyphen_values = true, value_parser = wait)]
    wait: Option<u32>,
    #[arg(short, long)]
    help: bool,
    #[arg(long)]
    version: bool,
    /// Everything from the first word that is not an option on.
    #[arg(trailing_var_arg = true, value_parser = clap::value_parser!(OsString))]
    command: Vec<OsString>,
}

fn ingress_rule(v: &str) -> Result<IngressRule, ArgsError> {
    Ok(v.parse()?)
}

fn egress_rule(v: &str) -> Result<EgressRule, ArgsError> {
    Ok(v.parse()?)
}

fn exclusion(v: &str) -> Result<EgressRule, ArgsError> {
    Ok(EgressRule::parse_exclude(v)?)
}

fn policy(v: &str) -> Result<GetsocknamePolicy, ArgsError> {
    match v {
        "host" => Ok(GetsocknamePolicy::Host),
        "app" => Ok(GetsocknamePolicy::App),
        _ => Err(ArgsError::BadPolicy(v.to_owned())),
    }
}

fn mode(v: &str) -> Result<Mode, ArgsError> {
    match v {
        "auto" => Ok(Mode::Auto),
        "preload" => Ok(Mode::Preload),
        "seccomp" => Ok(Mode::Seccomp),
        _ => Err(ArgsError::BadMode(v.to_owned())),
    }
}

fn wait(v: &str) -> Result<u32, ArgsError> {
    v.parse()
        .ok()
        .filter(|&s| s <= 3600)
        .ok_or_else(|| ArgsError::BadWait(v.to_owned()))
}

/// clap's error in graft's words. A value parser's own error is kept as it
/// is; the option clap names is the one the user spelled, except for a
/// missing value, where only the last word can be the option lacking it.
fn from_clap(e: &clap::Error, argv: &[OsString]) -> ArgsError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    if let Some(own) = e.source().and_then(|s| s.downcast_ref::<ArgsError>()) {
        return own.clone();
    }
    let named = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split([' ', '=']).next().unwrap_or(s).to_owned(),
        _ => String::new(),
    };
    match e.kind() {
        ErrorKind::UnknownArgument => ArgsError::Unknown(named),
        ErrorKind::TooManyValues => ArgsError::UnexpectedValue(named),
        ErrorKind::InvalidUtf8 => ArgsError::NotUtf8(named),
        ErrorKind::InvalidValue if named.starts_with('-') => {
            let last = argv.last().map(|w| w.to_string_lossy()).unwrap_or_default();
            let shown = match last.strip_prefix("--") {
                Some(_) => last.to_string(),
                None => last
                    .chars()
                    .last()
                    .map(|c| format!("-{c}"))
                    .unwrap_or(named),
            };
            ArgsError::MissingValue(shown)
        }
        // Not reached with graft's options; still one line.
        _ => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            ArgsError::Usage(first.trim_start_matches("error: ").to_owned())
        }
    }
}

/// Parses the arguments after the program name.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Parsed, ArgsError> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    let cli = Cli::try_parse_from(&argv).map_err(|e| from_clap(&e, &argv))?;
    if cli.help {
        return Ok(Parsed::Help);
    }
    if cli.version {
        return Ok(Parsed::Version);
    }
    if cli.command.is_empty() {
        return Err(ArgsError::NoCommand);
    }
    Ok(Parsed::Run(Args {
        verbose: cli.verbose,
        check: !cli.no_check,
        ingress: cli.ingress,
        egress: cli.egress,
        exclude: cli.exclude,
        getsockname: cli.getsockname,
        mode: cli.mode.unwrap_or(Mode::Auto),
        wait_secs: cli.wait.unwrap_or(0),
        command: cli.command,
    }))
}

/// The rule variables the program runs with, and every rule they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEnv {
    /// `(variable, value)` pairs to set; a variable with no rule is not listed.
    pub vars: Vec<(&'static str, String)>,
    /// Rules from the command line first, then the inherited ones.
    pub rules: RuleSet,
}

impl Args {
    /// Combines the command line's rules with rules already in the
    /// environment (so `graft … -- graft … -- cmd` adds up). The command
    /// line's come first: for ingress the first match wins, and for egress an
    /// equally long prefix keeps the earlier rule. Inherited values are
    /// validated too, since the preload library would refuse them anyway.
    pub fn rule_env(
        &self,
        inherited: impl Fn(&str) -> Option<String>,
    ) -> Result<RuleEnv, ArgsError> {
        use graft_core::{ENV_EGRESS, ENV_EGRESS_EXCLUDE, ENV_INGRESS};
        let old = |var: &'static str| -> Result<RuleSet, ArgsError> {
            let v = inherited(var);
            let (i, e, x) = match var {
                ENV_INGRESS => (v.as_deref(), None, None),
                ENV_EGRESS => (None, v.as_deref(), None),
                _ => (None, None, v.as_deref()),
            };
            RuleSet::from_env_values(i, e, x).map_err(|err| ArgsError::Inherited { var, err })
        };
        let mut rules = RuleSet {
            ingress: self.ingress.clone(),
            egress: self.egress.iter().chain(&self.exclude).copied().collect(),
        };
        rules.ingress.extend(old(ENV_INGRESS)?.ingress);
        rules.egress.extend(old(ENV_EGRESS)?.egress);
        rules.egress.extend(old(ENV_EGRESS_EXCLUDE)?.egress);
        let (i, e, x) = rules.to_env_values();
        let vars = [(ENV_INGRESS, i), (ENV_EGRESS, e), (ENV_EGRESS_EXCLUDE, x)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Ok(RuleEnv { vars, rules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Parsed, ArgsError> {
        parse(v.iter().map(OsString::from))
    }

    fn run(v: &[&str]) -> Args {
        match p(v) {
            Ok(Parsed::Run(a)) => a,
            other => panic!("{v:?} gave {other:?}"),
        }
    }

    #[test]
    fn modes() {
        assert_eq!(run(&["x"]).mode, Mode::Auto);
        assert_eq!(run(&["--mode", "seccomp", "x"]).mode, Mode::Seccomp);
        assert_eq!(run(&["--mode=preload", "x"]).mode, Mode::Preload);
        assert_eq!(
            p(&["--mode=static", "x"]),
            Err(ArgsError::BadMode("static".into()))
        );
        assert_eq!(
            p(&["--mode"]),
            Err(ArgsError::MissingValue("--mode".into()))
        );
        assert_eq!(run(&["--wait", "30", "x"]).wait_secs, 30);
        assert_eq!(
            p(&["--wait=soon", "x"]),
            Err(ArgsError::BadWait("soon".into()))
        );
    }

    #[test]
    fn af_graft_command_line() {
        let a = run(&[
            "-i",
            "0.0.0.0:0-65535=ep-in4",
            "-i",
            ":::0-65535=ep-in6",
            "-e",
            "0.0.0.0/0=ep-out4",
            "-e",
            "::/0=ep-out6",
            "--",
            "iperf3",
            "-s",
        ]);
        assert_eq!(a.ingress.len(), 2);
        assert_eq!(a.egress.len(), 2);
        assert!(a.check && !a.verbose);
        assert_eq!(a.command, vec![OsString::from("iperf3"), "-s".into()]);
    }

    #[test]
    fn stops_at_first_word_and_keeps_the_rest_verbatim() {
        let a = run(&["-v", "iperf3", "-s", "--", "-i", "x"]);
        assert!(a.verbose);
        assert_eq!(
            a.command,
            ["iperf3", "-s", "--", "-i", "x"].map(OsString::from)
        );
        let a = run(&["--", "--weird-name"]);
        assert_eq!(a.command, vec![OsString::from("--weird-name")]);
        let a = run(&["-", "x"]);
        assert_eq!(a.command[0], "-", "a lone dash is a word");
    }

    #[test]
    fn clusters_attached_values_and_long_forms() {
        let a = run(&[
            "-vn",
            "-i0.0.0.0:80=a",
            "-x",
            "127.0.0.0/8",
            "--egress=10.0.0.0/8=b",
            "--exclude",
            "::1/128",
            "-g",
            "app",
            "--no-check",
            "cmd",
        ]);
        assert!(a.verbose && !a.check);
        assert_eq!(a.ingress[0].to_string(), "0.0.0.0:80=a");
        assert_eq!(a.exclude.len(), 2);
        assert_eq!(a.egress[0].to_string(), "10.0.0.0/8=b");
        assert_eq!(a.getsockname, Some(GetsocknamePolicy::App));
        let a = run(&["-vi", "0.0.0.0:80=a", "cmd"]);
        assert!(a.verbose && a.ingress.len() == 1);
        let a = run(&["--getsockname=host", "cmd"]);
        assert_eq!(a.getsockname, Some(GetsocknamePolicy::Host));
    }

    #[test]
    fn usage_errors() {
        assert_eq!(p(&[]), Err(ArgsError::NoCommand));
        assert_eq!(p(&["-v", "--"]), Err(ArgsError::NoCommand));
        assert_eq!(p(&["-z", "cmd"]), Err(ArgsError::Unknown("-z".into())));
        assert_eq!(p(&["-vz", "cmd"]), Err(ArgsError::Unknown("-z".into())));
        assert_eq!(
            p(&["--frob", "cmd"]),
            Err(ArgsError::Unknown("--frob".into()))
        );
        assert_eq!(p(&["-i"]), Err(ArgsError::MissingValue("-i".into())));
        assert_eq!(
            p(&["--egress"]),
            Err(ArgsError::MissingValue("--egress".into()))
        );
        assert_eq!(
            p(&["--verbose=1", "cmd"]),
            Err(ArgsError::UnexpectedValue("--verbose".into()))
        );
        assert_eq!(
            p(&["-g", "both", "cmd"]),
            Err(ArgsError::BadPolicy("both".into()))
        );
        assert_eq!(p(&["-h"]), Ok(Parsed::Help));
        assert_eq!(p(&["--help", "cmd"]), Ok(Parsed::Help));
        assert_eq!(p(&["--version"]), Ok(Parsed::Version));
    }

    #[test]
    fn values_are_taken_as_given_and_options_repeat() {
        assert_eq!(
            p(&["--wait", "-1", "x"]),
            Err(ArgsError::BadWait("-1".into()))
        );
        assert_eq!(
            p(&["-g", "-v", "x"]),
            Err(ArgsError::BadPolicy("-v".into()))
        );
        assert_eq!(p(&["-vi"]), Err(ArgsError::MissingValue("-i".into())));
        let a = run(&["--mode", "seccomp", "--mode=preload", "-v", "-v", "x"]);
        assert_eq!(a.mode, Mode::Preload, "the last --mode wins");
        let a = run(&["-i", "0.0.0.0:80=a", "--ingress", "0.0.0.0:81=b", "x"]);
        assert_eq!(a.ingress.len(), 2);
        let a = run(&["-n", "ldconfig", "--version", "-h"]);
        assert_eq!(
            a.command,
            ["ldconfig", "--version", "-h"].map(OsString::from)
        );
        use std::os::unix::ffi::OsStringExt;
        let odd = OsString::from_vec(vec![0xff, b'x']);
        match parse([odd.clone(), "-v".into()]) {
            Ok(Parsed::Run(a)) => assert_eq!(a.command, vec![odd, "-v".into()]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_mappings_carry_the_rule_error_text() {
        let e = p(&["-i", "0.0.0.0:80", "cmd"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"0.0.0.0:80\": expected ADDR:PORT[-PORT]=ENDPOINT"
        );
        assert!(!e.wants_usage());
        let e = p(&["-e", "10.0.0.1/8=x", "cmd"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.0.0.1/8=x\": address has bits set beyond the prefix length"
        );
        let e = p(&["-x", "10.0.0.0/8=x", "cmd"]).unwrap_err();
        assert!(e.to_string().starts_with("\"10.0.0.0/8=x\": "), "{e}");
        let e = p(&["-i", "0.0.0.0:80=sixteen-bytes-xx", "cmd"]).unwrap_err();
        assert!(e.to_string().contains("longer than 15 bytes"), "{e}");
    }

    #[test]
    fn rule_env_puts_the_command_line_first_and_validates_inherited() {
        let a = run(&[
            "-i",
            "0.0.0.0:80=a",
            "-e",
            "0.0.0.0/0=b",
            "-x",
            "127.0.0.0/8",
            "cmd",
        ]);
        let env = a
            .rule_env(|k| (k == graft_core::ENV_INGRESS).then(|| ":::80=c, [::1]:81=d".to_owned()))
            .unwrap();
        assert_eq!(
            env.vars,
            vec![
                (
                    graft_core::ENV_INGRESS,
                    "0.0.0.0:80=a [::]:80=c [::1]:81=d".to_owned()
                ),
                (graft_core::ENV_EGRESS, "0.0.0.0/0=b".to_owned()),
                (graft_core::ENV_EGRESS_EXCLUDE, "127.0.0.0/8".to_owned()),
            ]
        );
        assert_eq!(env.rules.endpoints().len(), 4);
        let e = a
            .rule_env(|k| (k == graft_core::ENV_EGRESS).then(|| "nonsense".to_owned()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "GRAFT_EGRESS_CONVERT (from the environment): \"nonsense\": expected PREFIX/LEN=ENDPOINT"
        );
        let none = run(&["cmd"]).rule_env(|_| None).unwrap();
        assert!(none.vars.is_empty() && none.rules.is_empty());
    }
}
