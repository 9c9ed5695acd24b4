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
 *   VIGIL-DISK-WRITE-OK         (vigil.test=disk-write)
 *   VIGIL-DISK-READ-OK          (vigil.test=disk-read)
 *   VIGIL-DISK-SERIAL <id>      (vigil.test=disk-read)
 *   VIGIL-DISK-RO-OK            (vigil.test=disk-ro)
 *   VIGIL-VSOCK-GOT <line>      (vigil.test=vsock: the host's answer)
 *   VIGIL-VSOCK-HOST-SAID <line> (vigil.test=vsock: a host-initiated line)
 * vsock: connects to CID 2 port 7000, sends "HELLO-FROM-GUEST", prints the
 * line the host answers; then listens on port 7001, accepts one connection,
 * prints the line the host sends and answers "GUEST-ACK".
 *   VIGIL-NET-PING-OK           (vigil.test=net)
 *   VIGIL-NET-READY             (vigil.test=net: the host may ping now)
 * net: busybox gives eth0 198.18.77.2/24, pings the host's tap address
 * 198.18.77.1, prints READY, stays up 25 s for the host to ping it, then
 * powers off.
 * Tests: boot (marker, then power off), sysinfo, reboot, run, vsock, net, and the disk
 * tests on /dev/vda (see disk_pattern): disk-write writes 4 KiB at offset
 * 4 KiB and fsyncs; disk-read reads them back and checks them; disk-ro
 * checks that writing fails.
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

/*
 * The 4 KiB the disk tests write at offset 4096 of /dev/vda: the text
 * "VIGIL-DISK-PATTERN\n", then byte i = (i * 7 + 13) % 251. The host test
 * (tests/devices.rs) checks the same bytes in the image file.
 */
static void disk_pattern(unsigned char *buf)
{
	static const char head[] = "VIGIL-DISK-PATTERN\n";
	long i;

	for (i = 0; i < 4096; i++)
		buf[i] = (unsigned char)((i * 7 + 13) % 251);
	memcpy(buf, head, sizeof(head) - 1);
}

static void test_disk(const char *mode)
{
	static unsigned char want[4096], got[4096];
	static char serial[64];
	int fd;

	disk_pattern(want);
	if (strcmp(mode, "disk-write") == 0) {
		fd = open("/dev/vda", O_RDWR, 0);
		if (fd < 0 || lseek(fd, 4096, SEEK_SET) != 4096 ||
		    write(fd, want, sizeof(want)) != sizeof(want) || fsync(fd) != 0) {
			say("VIGIL-TEST-ERROR disk write failed", 0);
			return;
		}
		close(fd);
		say("VIGIL-DISK-WRITE-OK", 0);
	} else if (strcmp(mode, "disk-read") == 0) {
		fd = open("/dev/vda", O_RDONLY, 0);
		if (fd < 0 || lseek(fd, 4096, SEEK_SET) != 4096 ||
		    read(fd, got, sizeof(got)) != sizeof(got)) {
			say("VIGIL-TEST-ERROR disk read failed", 0);
			return;
		}
		close(fd);
		say(memcmp(want, got, sizeof(got)) == 0 ? "VIGIL-DISK-READ-OK" :
		    "VIGIL-TEST-ERROR disk contents differ", 0);
		if (slurp("/sys/block/vda/serial", serial, sizeof(serial)) >= 0)
			say("VIGIL-DISK-SERIAL ", serial);
	} else {
		/* disk-ro: the open itself may already fail with EROFS. */
		fd = open("/dev/vda", O_RDWR, 0);
		if (fd >= 0 && lseek(fd, 4096, SEEK_SET) == 4096 &&
		    write(fd, want, sizeof(want)) == sizeof(want) && fsync(fd) == 0)
			say("VIGIL-TEST-ERROR write to a read-only disk succeeded", 0);
		else
			say("VIGIL-DISK-RO-OK", 0);
	}
}

/* AF_VSOCK sockets through raw system calls (this nolibc has no socket API). */
struct vsock_addr {
	unsigned short family, reserved;
	unsigned int port, cid;
	unsigned char zero[4];
};

static long vsock_socket(void)
{
	return my_syscall3(__NR_socket, 40 /* AF_VSOCK */, 1 /* SOCK_STREAM */, 0);
}

/* Reads one line (without the newline) into buf; returns its length or -1. */
static long read_line(int fd, char *buf, long size)
{
	long n = 0;

	while (n < size - 1 && read(fd, buf + n, 1) == 1 && buf[n] != '\n')
		n++;
	buf[n] = '\0';
	return n > 0 ? n : -1;
}

static void test_vsock(void)
{
	struct vsock_addr a = { 40, 0, 7000, 2, { 0 } };
	static char line[256];
	long s, c;

	s = vsock_socket();
	if (s < 0 || my_syscall3(__NR_connect, s, &a, sizeof(a)) != 0) {
		say("VIGIL-TEST-ERROR vsock connect failed", 0);
		return;
	}
	write(s, "HELLO-FROM-GUEST\n", 17);
	if (read_line(s, line, sizeof(line)) < 0) {
		say("VIGIL-TEST-ERROR vsock read failed", 0);
		return;
	}
	say("VIGIL-VSOCK-GOT ", line);
	close(s);

	s = vsock_socket();
	a.port = 7001;
	a.cid = 0xffffffff; /* VMADDR_CID_ANY */
	if (s < 0 || my_syscall3(__NR_bind, s, &a, sizeof(a)) != 0 ||
	    my_syscall2(__NR_listen, s, 1) != 0) {
		say("VIGIL-TEST-ERROR vsock listen failed", 0);
		return;
	}
	say("VIGIL-VSOCK-LISTENING", 0);
	c = my_syscall3(__NR_accept, s, 0, 0);
	if (c < 0 || read_line(c, line, sizeof(line)) < 0) {
		say("VIGIL-TEST-ERROR vsock accept failed", 0);
		return;
	}
	say("VIGIL-VSOCK-HOST-SAID ", line);
	write(c, "GUEST-ACK\n", 10);
	/* Wait for the host to close: powering off at once could drop the
	 * answer still queued in this kernel. */
	read_line(c, line, sizeof(line));
	close(c);
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
	} else if (strcmp(test, "net") == 0) {
		static char *net_argv[] = { "sh", "-c",
			"ip addr add 198.18.77.2/24 dev eth0 && ip link set eth0 up && "
			"ping -c 2 -W 20 198.18.77.1 >/dev/null && echo VIGIL-NET-PING-OK || "
			"echo VIGIL-TEST-ERROR net ping failed; echo VIGIL-NET-READY; "
			"sleep 25; poweroff -f", 0 };

		execve("/bin/busybox", net_argv, envp);
		say("VIGIL-TEST-ERROR cannot start busybox sh", 0);
	} else if (strcmp(test, "vsock") == 0) {
		test_vsock();
	} else if (strncmp(test, "disk-", 5) == 0) {
		test_disk(test);
	} else if (strcmp(test, "boot") != 0) {
		say("VIGIL-TEST-ERROR unknown test ", test);
	}
	power_off();
	return 0;
}
