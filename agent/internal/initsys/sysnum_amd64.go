package initsys

// The frozen syscall package predates finit_module on amd64.
const sysFinitModule = 313
