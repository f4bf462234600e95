//! ZDS: the server ztunnel connects to (SOCK_SEQPACKET, protobuf, netns fd via SCM_RIGHTS).
