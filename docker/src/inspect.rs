//! Asking Docker which process holds a container's namespaces.

use std::process::{Command, Stdio};

/// Format for `docker inspect -f`: the init process's pid (0 when stopped)
/// and whether the container runs.
const FORMAT: &str = "{{.State.Pid}} {{.State.Running}}";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("cannot run docker: {0}")]
    NoDocker(String),
    #[error("docker inspect {container} failed: {message}")]
    Failed { container: String, message: String },
    #[error("docker inspect {container} printed \"{output}\", expected \"PID true|false\"")]
    Unexpected { container: String, output: String },
}

/// Parses the `FORMAT` line.
pub fn parse_state(container: &str, output: &str) -> Result<i32, InspectError> {
    let unexpected = || InspectError::Unexpected {
        container: container.to_owned(),
        output: output.trim().to_owned(),
    };
    let mut words = output.split_whitespace();
    let (Some(pid), Some(running), None) = (words.next(), words.next(), words.next()) else {
        return Err(unexpected());
    };
    let pid: i32 = pid.parse().map_err(|_| unexpected())?;
    match running {
        "true" if pid > 0 => Ok(pid),
        "true" | "false" => Err(InspectError::NotRunning(container.to_owned())),
        _ => Err(unexpected()),
    }
}

/// The host pid of the running container's init process.
pub fn container_pid(container: &str) -> Result<i32, InspectError> {
    let out = Command::new("docker")
        .args([
            "inspect",
            "--type",
            "container",
            "-f",
            FORMAT,
            "--",
            container,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| InspectError::NoDocker(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // The engine says "No such container" (newer: "No such object").
        if err.contains("No such container") || err.contains("No such object") {
            return Err(InspectError::NoSuchContainer(container.to_owned()));
        }
        let message = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim()
            .to_owned();
        return Err(InspectError::Failed {
            container: container.to_owned(),
            message,
        });
    }
    parse_state(container, &String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        assert_eq!(parse_state("c", "1234 true\n"), Ok(1234));
        assert_eq!(
            parse_state("c", "0 false\n"),
            Err(InspectError::NotRunning("c".into()))
        );
        assert_eq!(
            parse_state("c", "0 true\n").unwrap_err().to_string(),
            "container c is not running"
        );
        assert!(matches!(
            parse_state("c", "x true"),
            Err(InspectError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_state("c", "1 true extra"),
            Err(InspectError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_state("c", ""),
            Err(InspectError::Unexpected { .. })
        ));
    }
}
