/*
 * PID 1 of Vigil's default guest, built with the kernel's own nolibc
 * (tools/include/nolibc from the same linux-source package).
 *
 * Small and static on purpose: on nested KVM every system call and every
 * first touch of a page costs milliseconds of emulated kernel time, and the
 * kernel copies the initramfs byte by byte in emulated code, so each KiB of
 * /init costs boot time. A glibc-static /init was 700 KiB; this one is a few.
 *
 * It mounts /proc, /sys, /dev and /tmp, prints the boot marker with the
 * guest's uptime, then either runs the test named by `vigil.test=NAME` on the
 * kernel command line and powers off, or hands PID 1 to busybox init, which
 * starts a shell on the console (see /etc/inittab) and handles
 * poweroff/reboot.
 *
 * Markers (one line each, on the console):
 *   VIGIL-BOOT-OK uptime=<seconds>
 *   VIGIL-CPUS <n>              (vigil.test=sysinfo)
 *   VIGIL-MEMTOTAL-KB <n>       (vigil.test=sysinfo)
 *   VIGIL-COUNTER <n> t=<s>     (vigil.test=counter, once a second, forever)
 *   VIGIL-TEST-ERROR <reason>   (an unknown test or a failing step)
 * Tests: boot (marker, then power off), sysinfo, reboot, counter.
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
 * vigil.test=counter: prints VIGIL-COUNTER <n> once a second, forever. The
 * count lives in guest memory, so pause/resume and snapshot/restore tests
 * can tell "continued" (n grows from where it was) from "rebooted" (n
 * starts again at 0). Time is read from CLOCK_MONOTONIC after each sleep so
 * the line also shows the guest's own view of elapsed time (t=<seconds>).
 */
static void test_counter(void)
{
	struct timespec one = { 1, 0 }, now;
	long n;

	for (n = 0;; n++) {
		my_syscall2(__NR_clock_gettime, 1 /* CLOCK_MONOTONIC */, &now);
		write(1, "VIGIL-COUNTER ", 14);
		write(1, itoa(n), strlen(itoa(n)));
		write(1, " t=", 3);
		say(itoa(now.tv_sec), 0);
		my_syscall2(__NR_nanosleep, &one, 0);
	}
}

int main(void)
{
	static char cmdline[4096];
	char uptime[64] = "?", test[64];
	char *argv[] = { "init", 0 };
	char *envp[] = { "PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root", 0 };
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

	if (slurp("/proc/cmdline", cmdline, sizeof(cmdline)) < 0 ||
	    !cmdline_value(cmdline, "vigil.test", test, sizeof(test))) {
		execve("/bin/busybox", argv, envp);
		say("VIGIL-TEST-ERROR cannot start busybox init", 0);
		power_off();
	}

	if (strcmp(test, "sysinfo") == 0) {
		test_sysinfo();
	} else if (strcmp(test, "counter") == 0) {
		test_counter();
	} else if (strcmp(test, "reboot") == 0) {
		sync_all();
		reboot(LINUX_REBOOT_CMD_RESTART);
	} else if (strcmp(test, "boot") != 0) {
		say("VIGIL-TEST-ERROR unknown test ", test);
	}
	power_off();
	return 0;
}
