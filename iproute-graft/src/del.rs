//! `ip graft del NAME`.

use std::os::fd::AsFd;
use std::path::Path;

use graft_core::proto::control::Request;
use graft_core::EndpointName;

use crate::args::{usage, Usage};
use crate::{client, netns};

/// Parses the words after `del`.
pub fn parse(args: &[String]) -> Result<EndpointName, Usage> {
    match args {
        [] => Err(usage!(
            "Error: argument \"NAME\" is required: ip graft del NAME"
        )),
        [name] => EndpointName::new(name).map_err(|e| usage!("Error: {e}")),
        [_, extra, ..] => Err(usage!(
            "Error: invalid argument \"{extra}\"; try \"ip graft help\"."
        )),
    }
}

/// Asks graftd to remove the endpoint from our namespace.
pub fn run(name: EndpointName, control: &Path) -> anyhow::Result<()> {
    let me = netns::open_self()
        .map_err(|e| anyhow::anyhow!("cannot open /proc/self/ns/net: {}", netns::desc(&e)))?;
    client::call(control, &Request::Del { name }, &[me.as_fd()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<EndpointName, String> {
        crate::args::parse_typed(parse, s)
    }

    #[test]
    fn parses_one_name() {
        assert_eq!(p("ep-in4").unwrap().as_str(), "ep-in4");
        for (input, want) in [
            (
                "",
                "Error: argument \"NAME\" is required: ip graft del NAME",
            ),
            (
                "a b",
                "Error: invalid argument \"b\"; try \"ip graft help\".",
            ),
            (
                "sixteen-bytes-xx",
                "Error: endpoint name \"sixteen-bytes-xx\" is longer than 15 bytes",
            ),
        ] {
            assert_eq!(p(input).unwrap_err(), want, "{input}");
        }
        assert_eq!(
            parse(&[String::new()]).unwrap_err().0,
            "Error: endpoint name is empty"
        );
    }
}
