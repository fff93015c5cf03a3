//! vhost-user-console: placeholder until its issue lands.
