use clap::Parser;
use vhost_user_console::args::{Args, Config};

fn main() {
    let args = Args::try_parse().unwrap_or_else(|e| {
        if !e.use_stderr() {
            e.exit(); // --help, --version
        }
        let text = e.render().to_string();
        eprintln!(
            "vhost-user-console: {} (see --help)",
            text.lines().next().unwrap_or("bad arguments")
        );
        std::process::exit(2);
    });
    if args.listen.print_capabilities {
        let features = ["pty", "unix", "tcp", "history", "multiport"];
        println!(
            "{}",
            vhost_user_common::caps::capabilities_json("console", &features)
        );
        return;
    }
    vhost_user_common::logging::init(args.listen.log_level);
    let config = Config::try_from(args).unwrap_or_else(|e| {
        vhost_user_common::logging::fatal("vhost-user-console", &e);
        std::process::exit(1);
    });
    if let Err(e) = vhost_user_console::run(config) {
        vhost_user_common::logging::fatal("vhost-user-console", &e);
        std::process::exit(1);
    }
}
