/*
 * PID 1 of Vigil's default guest, built with the kernel's own nolibc
 * (tools/include/nolibc from the same linux-source package).
 *
 * Small and static on purpose: on nested KVM every system call and every
 * first touch of a page costs milliseconds of emulated kernel time, and the
 * kernel copies the initramfs byte by byte in emulated code, so each KiB of
 * /init costs boot time. A glibc-static /init was 700 KiB; this one is a few.
 *
 * It mounts /proc, /sys, /dev and /tmp and prints the boot marker with the
 * guest's uptime. Then it starts the tools daemon (`/bin/vigil-tools daemon`,
 * heartbeats to the host over vsock, see guest-tools/PROTOCOL.md) and the
 * workloads named on the kernel command line, in the background, and either
 * runs the test named by `vigil.test=NAME` and powers off, or hands PID 1 to
 * busybox init, which starts a shell on the console (see /etc/inittab) and
 * handles poweroff/reboot.
 *
 * Kernel command line keys:
 *   vigil.test=NAME     boot (marker, then power off), sysinfo, reboot, or
 *                       run: wait until the vigil.run workloads exit, print
 *                       VIGIL-RUN-DONE, power off
 *   vigil.tools=off     do not start the tools daemon
 *   vigil.run=W[:OPTS][+W[:OPTS]]...
 *                       start workload W as `/bin/vigil-tools W OPTS` (at most
 *                       8), e.g. vigil.run=dirty:mib=64,rate=0+counter:every=5
 *                       Workloads: dirty, disk-write, disk-verify, echo,
 *                       counter (options: `vigil-tools help`, README.md)
 *
 * Markers (one line each, on the console):
 *   VIGIL-BOOT-OK uptime=<seconds>
 *   VIGIL-CPUS <n>              (vigil.test=sysinfo)
 *   VIGIL-MEMTOTAL-KB <n>       (vigil.test=sysinfo)
 *   VIGIL-RUN-DONE status=<n>   (vigil.test=run; the highest exit status)
 *   VIGIL-TEST-ERROR <reason>   (an unknown test or a failing step)
 * vigil-tools prints its own (VIGIL-TOOLS-*, VIGIL-DIRTY*, VIGIL-DISK*,
 * VIGIL-ECHO-READY, VIGIL-COUNTER).
 */

/* nolibc of this kernel version has neither sync() nor pause(). */
static void sync_all(void)
{
	my_syscall0(__NR_sync);
}

static void wait_forever(void)
{
	for (;;)
		my_syscall0(__NR_pause);
}

static void say(const char *a, const char *b)
{
	write(1, a, strlen(a));
	if (b)
		write(1, b, strlen(b));
	write(1, "\n", 1);
}

/* Reads a small file into buf (NUL-terminated); returns the length or -1. */
static long slurp(const char *path, char *buf, long size)
{
	long n, total = 0;
	int fd = open(path, O_RDONLY, 0);

	if (fd < 0)
		return -1;
	while (total < size - 1 && (n = read(fd, buf + total, size - 1 - total)) > 0)
		total += n;
	close(fd);
	buf[total] = '\0';
	return total;
}

/* Returns the first occurrence of needle in hay, or 0. */
static const char *find(const char *hay, const char *needle)
{
	long n = strlen(needle);

	for (; *hay; hay++)
		if (memcmp(hay, needle, n) == 0)
			return hay;
	return 0;
}

static void mount_or_warn(const char *src, const char *dst, const char *type)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, 0, 0) != 0 && errno != EBUSY)
		say("VIGIL-TEST-ERROR mount failed: ", dst);
}

static void power_off(void)
{
	sync_all();
	reboot(LINUX_REBOOT_CMD_POWER_OFF);
	/* Only reached if the kernel could not power off (no ACPI). */
	say("VIGIL-TEST-ERROR power off failed", 0);
	wait_forever();
}

/* Copies the value of `key=value` on the kernel command line into out. */
static int cmdline_value(const char *cmdline, const char *key, char *out, long size)
{
	long klen = strlen(key), n;
	const char *p = cmdline;

	while ((p = find(p, key)) != 0) {
		if ((p == cmdline || p[-1] == ' ') && p[klen] == '=') {
			p += klen + 1;
			for (n = 0; n < size - 1 && p[n] && p[n] != ' ' && p[n] != '\n'; n++)
				out[n] = p[n];
			out[n] = '\0';
			return 1;
		}
		p += klen;
	}
	return 0;
}

static char *envp[] = { "PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root", 0 };
static char tools[] = "/bin/vigil-tools";

/* Starts argv[0] in the background; returns its pid or -1. */
static int spawn(char *argv[])
{
	int pid = fork();

	if (pid == 0) {
		execve(argv[0], argv, envp);
		say("VIGIL-TEST-ERROR cannot run ", argv[0]);
		exit(127);
	}
	if (pid < 0)
		say("VIGIL-TEST-ERROR cannot fork for ", argv[0]);
	return pid;
}

#define MAX_WORKLOADS 8

/*
 * Starts each workload of `W[:OPTS][+W[:OPTS]]...` (spec is cut up in
 * place); returns how many started, their pids in pids[].
 */
static int start_workloads(char *spec, int pids[MAX_WORKLOADS])
{
	int n = 0;

	while (*spec && n < MAX_WORKLOADS) {
		char *item = spec, *opts = 0, *argv[4];

		while (*spec && *spec != '+')
			spec++;
		if (*spec)
			*spec++ = '\0';
		for (opts = item; *opts && *opts != ':'; opts++)
			;
		if (*opts)
			*opts++ = '\0';
		if (!*item)
			continue;
		argv[0] = tools;
		argv[1] = item;
		argv[2] = *opts ? opts : 0;
		argv[3] = 0;
		pids[n] = spawn(argv);
		if (pids[n] > 0)
			n++;
	}
	if (*spec)
		say("VIGIL-TEST-ERROR too many workloads, not started: ", spec);
	return n;
}

/* Waits for the workloads; returns the highest exit status (128+signal). */
static int wait_workloads(const int pids[], int n)
{
	int i, status = 0, code, worst = 0;

	for (i = 0; i < n; i++) {
		while (waitpid(pids[i], &status, 0) < 0 && errno == EINTR)
			;
		code = (status & 0x7f) ? 128 + (status & 0x7f) : (status >> 8) & 0xff;
		if (code > worst)
			worst = code;
	}
	return worst;
}

static void test_sysinfo(void)
{
	static char buf[65536];
	const char *p;
	int cpus = 0;

	if (slurp("/proc/cpuinfo", buf, sizeof(buf)) > 0)
		for (p = buf; (p = find(p, "processor\t")) != 0; p++)
			cpus++;
	say("VIGIL-CPUS ", itoa(cpus));

	if (slurp("/proc/meminfo", buf, sizeof(buf)) > 0 &&
	    (p = find(buf, "MemTotal:")) != 0) {
		p += strlen("MemTotal:");
		while (*p == ' ')
			p++;
		say("VIGIL-MEMTOTAL-KB ", itoa(atol(p)));
	}
}

int main(void)
{
	static char cmdline[4096], run[1024];
	char uptime[64] = "?", test[64], flag[16];
	char *argv[] = { "init", 0 };
	char *daemon_argv[] = { tools, "daemon", 0 };
	int pids[MAX_WORKLOADS], nworkloads = 0;
	long i;

	mount_or_warn("proc", "/proc", "proc");
	mount_or_warn("sysfs", "/sys", "sysfs");
	mount_or_warn("devtmpfs", "/dev", "devtmpfs");
	mount_or_warn("tmpfs", "/tmp", "tmpfs");

	if (slurp("/proc/uptime", uptime, sizeof(uptime)) > 0)
		for (i = 0; uptime[i]; i++)
			if (uptime[i] == ' ')
				uptime[i] = '\0';
	say("VIGIL-BOOT-OK uptime=", uptime);

	if (slurp("/proc/cmdline", cmdline, sizeof(cmdline)) < 0)
		cmdline[0] = '\0';
	if (!cmdline_value(cmdline, "vigil.tools", flag, sizeof(flag)) ||
	    strcmp(flag, "off") != 0)
		spawn(daemon_argv);
	if (cmdline_value(cmdline, "vigil.run", run, sizeof(run)))
		nworkloads = start_workloads(run, pids);

	if (!cmdline_value(cmdline, "vigil.test", test, sizeof(test))) {
		execve("/bin/busybox", argv, envp);
		say("VIGIL-TEST-ERROR cannot start busybox init", 0);
		power_off();
	}

	if (strcmp(test, "sysinfo") == 0) {
		test_sysinfo();
	} else if (strcmp(test, "reboot") == 0) {
		sync_all();
		reboot(LINUX_REBOOT_CMD_RESTART);
	} else if (strcmp(test, "run") == 0) {
		if (nworkloads == 0)
			say("VIGIL-TEST-ERROR vigil.test=run without vigil.run workloads", 0);
		else
			say("VIGIL-RUN-DONE status=", itoa(wait_workloads(pids, nworkloads)));
	} else if (strcmp(test, "boot") != 0) {
		say("VIGIL-TEST-ERROR unknown test ", test);
	}
	power_off();
	return 0;
}
