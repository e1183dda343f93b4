package initsys

const sysFinitModule = 273
