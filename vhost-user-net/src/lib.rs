//! vhost-user-net: placeholder until its issue lands.
