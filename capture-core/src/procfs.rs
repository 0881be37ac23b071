//! What `/proc/PID/stat` says about a process.

/// The fields after "pid (comm) ", split on spaces (comm may contain
/// spaces and parentheses, so the split starts at the last ')').
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_after_comm(&stat)
}

fn parse_after_comm(stat: &str) -> Option<Vec<String>> {
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// The state letter (`T` = stopped), `None` if the process is gone.
pub fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// When the process started, in clock ticks (`USER_HZ`) since boot: field
/// 22 of `/proc/PID/stat`, which the kernel derives from the thread
/// group leader's `start_boottime`. With the pid it names one process for
/// the life of the machine, since a pid is reused only by a later process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    // Field 22 counted from 1, where field 3 (the state) is index 0 here.
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_after_a_comm_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 10";
        let f = parse_after_comm(stat).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[22 - 3], "12345");
    }

    #[test]
    fn this_process_is_running_and_started_after_boot() {
        let me = std::process::id();
        assert!(matches!(state(me), Some('R' | 'S')));
        let ticks = start_ticks(me).unwrap();
        assert!(ticks > 0);
        assert_eq!(start_ticks(me), Some(ticks));
    }
}
