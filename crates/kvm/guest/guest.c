/*
 * livemig test guest: each vCPU writes its part of a working set at a chosen rate, stamping
 * every page with its address, a generation and a checksum, and keeps a log of what it wrote.
 * On request it verifies every page of its part against the log and against its own step
 * counter, and reports any page that does not hold what it last wrote.
 *
 * Port I/O protocol (see livemig-kvm's `guest` module, which is the authority):
 *   out 0xe9 (8-bit)   text, one byte at a time (QEMU's isa-debugcon)
 *   out 0xea (32-bit)  event header: kind << 24 | cpu << 16 | number of data words
 *   out 0xec (32-bit)  event data words
 *   in  0xeb (32-bit)  command for this vCPU: 0 (or all ones: no device) none, 1 verify, 2 halt,
 *                      3 one pass, 4 take a #GP, 5 triple-fault
 *   mailbox            where the port has no command (0, or all ones under a VMM without the
 *                      device, e.g. QEMU), the u32 at MAILBOX + 4 * cpu in guest RAM: a
 *                      nonzero value is the command, and the guest clears it on taking it
 *                      (a host writes it through the VMM's mapping of guest RAM)
 *   steps              every POLL_EVERY pages each vCPU stores its step count (u64) at
 *                      STEPS + 8 * cpu, for a host that reads guest RAM (the write rate
 *                      under another VMM)
 *
 * With `uart=PORT` on the command line, vCPU 0 also owns a 16550-style UART at that port base
 * (the VMM forwards the eight ports to an assigned device's I/O BAR, e.g. an mtty): at its
 * first start it enables the FIFO and programs LCR, MCR, SCR and four bytes into the loop-back
 * FIFO, values of its own choosing (from the TSC) kept in guest memory; on verify it reads them
 * back, pushes the FIFO bytes in again (the device keeps its state) and reports both.
 *
 * Memory: logs at 8 MiB (one u32 generation per page), working sets from 16 MiB,
 * vCPU c owns pages [c * pages, (c + 1) * pages).
 *
 * Built with gcc -ffreestanding -nostdlib as 64-bit code (entry64.S enters it in ring 3 with
 * IOPL 3): no libc, no floating point, no privileged instruction.
 */
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;

#define MAX_CPUS 8
#define PAGE 4096u
#define LOG_BASE 0x00800000u
#define WS_BASE 0x01000000u
#define PAGE_MAGIC 0x474d504cu /* "LMPG" */
#define STATE_MAGIC 0x54534d4cu /* "LMST" */
#define UART_MAGIC 0x5452554cu /* "LURT" */

/* 16550 register offsets (DLAB clear) and the bits used here. */
enum { UART_DATA = 0, UART_FCR = 2, UART_LCR = 3, UART_MCR = 4, UART_SCR = 7 };
#define UART_FCR_ENABLE_CLEAR 0x07u /* enable, clear both FIFOs: a used device starts empty */

enum { EV_READY = 1, EV_PROGRESS = 2, EV_VERIFY_DONE = 3, EV_VERIFY_FAIL = 4, EV_HALTED = 5,
       EV_CONFIG = 6, EV_PASS_DONE = 7, EV_UART_SET = 8, EV_UART_CHECK = 9, EV_EXCEPTION = 10 };
enum { FAIL_HEADER = 1, FAIL_GENERATION = 2, FAIL_LOG = 3, FAIL_BODY = 4 };
enum { CMD_NONE = 0, CMD_VERIFY = 1, CMD_HALT = 2, CMD_PASS = 3, CMD_FAULT = 4, CMD_SHUTDOWN = 5 };

/* Set in ring 3 before the #GP of CMD_SHUTDOWN; the ring-0 handler then triple-faults. */
static volatile u32 shutdown_requested;

#define MAILBOX 0x6000u
#define STEPS (MAILBOX + 0x100u)

#define PROGRESS_EVERY 1024u
#define POLL_EVERY 64u

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline void outl(unsigned short port, u32 v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}
static inline unsigned char inb(unsigned short port)
{
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 inl(unsigned short port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void pause(void) { __asm__ volatile("pause"); }

/* One page per vCPU so that its counter page is its own. */
struct cpu_state {
    u32 magic;
    u32 cpu;
    u32 next;  /* the next page index to write */
    u32 gen;   /* the generation being written (pages < next have it, the others gen - 1) */
    u64 steps; /* pages written since boot */
    u64 deadline;
    u32 verifies;
    u32 pad[1013];
} __attribute__((aligned(4096)));

static struct cpu_state cpus[MAX_CPUS];

/* Written by vCPU 0 from the command line; the others wait for `ready`. */
static volatile u32 cfg_ready;
static u32 cfg_cpus = 1, cfg_pages = 1024;
static u64 cfg_period; /* TSC ticks per page write; 0 = as fast as possible */
static u32 cfg_uart;   /* the UART's port base; 0 = none */
static u32 cfg_sipi;   /* vCPU 0 starts the others with INIT-SIPI-SIPI (they wait for it) */
static volatile u32 aps_up; /* APs that reached guest_main */
static u32 cfg_tsc_khz = 3000000; /* the TSC's rate, for the waits of the AP start */

/* What vCPU 0 programmed into the UART (in guest RAM, so it migrates with the pages). */
static struct {
    u32 magic;
    unsigned char lcr, mcr, scr, pad;
    unsigned char fifo[4];
} uart;
static u32 cfg_idle;   /* write only on CMD_PASS: one pass over the working set each */

/* One line at a time on the console: the vCPUs write it byte by byte, so whoever holds this
 * (in guest RAM, migrated with it) writes its whole line. */
static volatile u32 console_busy;
static void console_lock(void)
{
    while (__atomic_exchange_n(&console_busy, 1, __ATOMIC_ACQUIRE))
        pause();
}
static void console_unlock(void) { __atomic_store_n(&console_busy, 0, __ATOMIC_RELEASE); }

static void puts(const char *s)
{
    while (*s)
        outb(0xe9, (unsigned char)*s++);
}
static void putu(u32 v)
{
    char b[11];
    int i = 10;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    puts(&b[i]);
}

static void event(u32 kind, u32 cpu, const u32 *w, u32 n)
{
    outl(0xea, (kind << 24) | (cpu << 16) | n);
    for (u32 i = 0; i < n; i++)
        outl(0xec, w[i]);
}

static u32 *log_of(u32 cpu) { return (u32 *)(uptr)(LOG_BASE + cpu * cfg_pages * 4u); }
static u32 page_gpa(u32 cpu, u32 idx) { return WS_BASE + (cpu * cfg_pages + idx) * PAGE; }

/* Body word i of the page at `gpa` in generation `gen`, and the checksum over the body. */
static u32 body_seed(u32 gpa, u32 gen) { return gpa ^ (gen * 0x9e3779b9u) ^ 0x5bd1e995u; }

static void write_page(u32 cpu, u32 idx, u32 gen)
{
    u32 gpa = page_gpa(cpu, idx);
    volatile u32 *p = (volatile u32 *)(uptr)gpa;
    u32 x = body_seed(gpa, gen), sum = 0;
    for (u32 i = 5; i < PAGE / 4; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = x;
        sum = ((sum << 5) | (sum >> 27)) ^ x;
    }
    p[1] = gpa;
    p[2] = gen;
    p[3] = cpu;
    p[4] = sum;
    p[0] = PAGE_MAGIC;
}

/* 0 if the page holds generation `gen` intact, else the failure reason; *found = its gen. */
static u32 check_page(u32 cpu, u32 idx, u32 gen, u32 *found)
{
    u32 gpa = page_gpa(cpu, idx);
    volatile u32 *p = (volatile u32 *)(uptr)gpa;
    *found = p[2];
    if (gen == 0) /* never written: must still be untouched (zero) */
        return (p[0] == 0 && p[2] == 0) ? 0 : FAIL_HEADER;
    if (p[0] != PAGE_MAGIC || p[1] != gpa || p[3] != cpu)
        return FAIL_HEADER;
    if (p[2] != gen)
        return FAIL_GENERATION;
    u32 x = body_seed(gpa, gen), sum = 0;
    for (u32 i = 5; i < PAGE / 4; i++) {
        x = x * 1664525u + 1013904223u;
        if (p[i] != x)
            return FAIL_BODY;
        sum = ((sum << 5) | (sum >> 27)) ^ x;
    }
    return p[4] == sum ? 0 : FAIL_BODY;
}

/* The programmed registers as two words: lcr | mcr << 8 | scr << 16, and the FIFO bytes. */
static void uart_words(u32 *w, unsigned char lcr, unsigned char mcr, unsigned char scr,
                       const unsigned char *fifo)
{
    w[0] = (u32)lcr | (u32)mcr << 8 | (u32)scr << 16;
    w[1] = (u32)fifo[0] | (u32)fifo[1] << 8 | (u32)fifo[2] << 16 | (u32)fifo[3] << 24;
}

static void uart_program(void)
{
    unsigned short b = (unsigned short)cfg_uart;
    u32 seed = (u32)rdtsc() * 0x9e3779b9u;
    uart.lcr = (unsigned char)(0x03 | ((seed >> 3) & 0x3c)); /* 8 bits; parity, stop: chosen */
    uart.mcr = (unsigned char)(1 + (seed >> 9) % 15);
    uart.scr = (unsigned char)(1 + (seed >> 17) % 255);
    for (u32 i = 0; i < 4; i++)
        uart.fifo[i] = (unsigned char)(0x41 + ((seed >> (4 * i)) & 0x1f));
    outb(b + UART_FCR, UART_FCR_ENABLE_CLEAR);
    outb(b + UART_LCR, uart.lcr);
    outb(b + UART_MCR, uart.mcr);
    outb(b + UART_SCR, uart.scr);
    for (u32 i = 0; i < 4; i++)
        outb(b + UART_DATA, uart.fifo[i]);
    uart.magic = UART_MAGIC;
    u32 w[2];
    uart_words(w, uart.lcr, uart.mcr, uart.scr, uart.fifo);
    event(EV_UART_SET, 0, w, 2);
    puts("livemig-guest: uart programmed\n");
}

static void uart_check(void)
{
    unsigned short b = (unsigned short)cfg_uart;
    unsigned char got[4];
    unsigned char lcr = inb(b + UART_LCR), mcr = inb(b + UART_MCR), scr = inb(b + UART_SCR);
    for (u32 i = 0; i < 4; i++)
        got[i] = inb(b + UART_DATA);
    for (u32 i = 0; i < 4; i++) /* what was read is pushed back: the device keeps its state */
        outb(b + UART_DATA, got[i]);
    u32 w[4];
    uart_words(w, uart.lcr, uart.mcr, uart.scr, uart.fifo);
    uart_words(w + 2, lcr, mcr, scr, got);
    event(EV_UART_CHECK, 0, w, 4);
    puts(w[0] == w[2] && w[1] == w[3] ? "livemig-guest: uart verify ok\n"
                                      : "livemig-guest: uart verify FAILED\n");
}

static void verify(struct cpu_state *s)
{
    u32 *log = log_of(s->cpu);
    u32 failures = 0;
    for (u32 i = 0; i < cfg_pages; i++) {
        u32 expect = i < s->next ? s->gen : s->gen - 1;
        u32 found = 0, why = 0;
        if (log[i] != expect)
            why = FAIL_LOG;
        else
            why = check_page(s->cpu, i, expect, &found);
        if (why) {
            if (failures < 16) {
                u32 w[5] = {page_gpa(s->cpu, i), expect, found, log[i], why};
                event(EV_VERIFY_FAIL, s->cpu, w, 5);
                console_lock();
                puts("livemig-guest: cpu");
                putu(s->cpu);
                puts(" page ");
                putu(page_gpa(s->cpu, i));
                puts(" does not hold what was last written\n");
                console_unlock();
            }
            failures++;
        }
    }
    if (s->cpu == 0 && cfg_uart && uart.magic == UART_MAGIC)
        uart_check();
    s->verifies++;
    u32 w[4] = {cfg_pages, failures, (u32)s->steps, (u32)(s->steps >> 32)};
    event(EV_VERIFY_DONE, s->cpu, w, 4);
    console_lock();
    puts("livemig-guest: cpu");
    putu(s->cpu);
    puts(failures ? " verify FAILED\n" : " verify ok\n");
    console_unlock();
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static u64 parse_num(const char **sp)
{
    const char *s = *sp;
    u64 v = 0;
    while (is_digit(*s))
        v = v * 10 + (u64)(*s++ - '0');
    *sp = s;
    return v;
}

static int key_is(const char *s, const char *k)
{
    while (*k)
        if (*s++ != *k++)
            return 0;
    return *s == '=';
}

/* Multiboot information (spec section 3.3): flags at 0, cmdline pointer at 16 if bit 2. */
static void parse_cmdline(u32 mbi)
{
    if (!mbi || !(*(volatile u32 *)(uptr)mbi & 4))
        return;
    const char *s = (const char *)(uptr)*(volatile u32 *)(uptr)(mbi + 16);
    while (*s) {
        while (*s == ' ')
            s++;
        const char *k = s;
        while (*s && *s != '=' && *s != ' ')
            s++;
        if (*s != '=')
            continue;
        s++;
        u64 v = parse_num(&s);
        if (key_is(k, "cpus"))
            cfg_cpus = (u32)v;
        else if (key_is(k, "pages"))
            cfg_pages = (u32)v;
        else if (key_is(k, "period"))
            cfg_period = v;
        else if (key_is(k, "idle"))
            cfg_idle = (u32)v;
        else if (key_is(k, "uart"))
            cfg_uart = (u32)v;
        else if (key_is(k, "sipi"))
            cfg_sipi = (u32)v;
        else if (key_is(k, "tsc_khz") && v)
            cfg_tsc_khz = (u32)v;
        while (*s && *s != ' ')
            s++;
    }
}

/*
 * Starting the APs (cfg_sipi). The local APIC is at its reset base 0xfee00000, which the
 * identity tables map user-accessible, so ring 3 programs it with plain stores: the
 * spurious-interrupt register (0xf0) to enable it, then the interrupt command register
 * (0x300, destination 0x310) with the all-excluding-self shorthand: INIT, then the start-up
 * IPI twice (Intel SDM vol. 3A, 10.6.1 and 9.4.4.1; the waits are the SDM's 10 ms and 200 us,
 * in TSC ticks at the rate the VMM passes as `tsc_khz`, 3 GHz if it passes none).
 */
#define APIC_BASE 0xfee00000u
#define AP_TRAMP 0x10000u
extern const char ap_tramp[], ap_tramp_end[];

static void apic_write(u32 reg, u32 v) { *(volatile u32 *)(uptr)(APIC_BASE + reg) = v; }
static u32 apic_read(u32 reg) { return *(volatile u32 *)(uptr)(APIC_BASE + reg); }

static void wait_us(u64 us)
{
    u64 end = rdtsc() + us * cfg_tsc_khz / 1000;
    while (rdtsc() < end)
        pause();
}

static void send_ipi(u32 low)
{
    apic_write(0x310, 0);
    apic_write(0x300, low);
    for (u32 i = 0; i < 1000000 && (apic_read(0x300) & (1u << 12)); i++) /* delivery status */
        pause();
}

static void start_aps(void)
{
    /* Each AP's TSS (0x100 * index, see entry64.S): its I/O bitmap offset at 0x66 pointing at
     * the shared all-clear bitmap at 0x1000, closed by an all-ones byte at 0x3000. */
    for (u32 c = 1; c < cfg_cpus; c++)
        *(volatile unsigned short *)(uptr)(0x100u * c + 0x66) = (unsigned short)(0x1000u - 0x100u * c);
    for (u32 a = 0x1000; a < 0x3000; a += 4)
        *(volatile u32 *)(uptr)a = 0;
    *(volatile unsigned char *)(uptr)0x3000 = 0xff;
    for (uptr i = 0; i < (uptr)(ap_tramp_end - ap_tramp); i++)
        ((volatile char *)(uptr)AP_TRAMP)[i] = ap_tramp[i];
    apic_write(0xf0, apic_read(0xf0) | 0x1ffu); /* software-enable, spurious vector 0xff */
    send_ipi(0x000c4500u);                       /* all but self, level assert, INIT */
    wait_us(10000);
    for (u32 n = 0; n < 2; n++) {
        send_ipi(0x000c4600u | (AP_TRAMP >> 12)); /* all but self, start-up */
        wait_us(200);
    }
    u64 end = rdtsc() + 2000000ull * cfg_tsc_khz / 1000; /* 2 s */
    while (aps_up < cfg_cpus - 1 && rdtsc() < end)
        pause();
    if (aps_up < cfg_cpus - 1) {
        u32 w[2] = {cfg_cpus, aps_up + 1};
        event(EV_CONFIG, 0, w, 2);
        puts("livemig-guest: only ");
        putu(aps_up + 1);
        puts(" of ");
        putu(cfg_cpus);
        puts(" cpus started\n");
        for (;;)
            pause();
    }
    puts("livemig-guest: ");
    putu(cfg_cpus - 1);
    puts(" AP(s) started by INIT-SIPI-SIPI\n");
}

/* One page: write it, log it, advance the counter; report progress now and then. */
static void step(struct cpu_state *s, u32 *w)
{
    u32 *log = log_of(s->cpu);
    write_page(s->cpu, s->next, s->gen);
    log[s->next] = s->gen;
    s->steps++;
    if (++s->next == cfg_pages) {
        s->next = 0;
        s->gen++;
        if (s->gen == 2) {
            console_lock();
            puts("livemig-guest: cpu");
            putu(s->cpu);
            puts(" wrote its working set once\n");
            console_unlock();
        }
    }
    if (((u32)s->steps % POLL_EVERY) == 0)
        *(volatile u64 *)(uptr)(STEPS + 8u * s->cpu) = s->steps;
    if (((u32)s->steps % PROGRESS_EVERY) == 0) {
        w[0] = (u32)s->steps;
        w[1] = (u32)(s->steps >> 32);
        w[2] = s->gen;
        w[3] = s->next;
        event(EV_PROGRESS, s->cpu, w, 4);
    }
}

/* This vCPU's next command: the VMM's port first, then its mailbox word. */
static u32 command(u32 cpu)
{
    u32 cmd = inl(0xeb);
    if (cmd != 0 && cmd != 0xffffffffu)
        return cmd;
    volatile u32 *m = (volatile u32 *)(uptr)(MAILBOX + 4u * cpu);
    cmd = *m;
    if (cmd)
        *m = 0;
    return cmd;
}

static void run(u32 cpu)
{
    struct cpu_state *s = &cpus[cpu];
    u32 w[4];
    if (s->magic != STATE_MAGIC) {
        s->magic = STATE_MAGIC;
        s->cpu = cpu;
        s->next = 0;
        s->gen = 1;
        s->steps = 0;
        s->deadline = rdtsc();
    }
    if (cpu == 0 && cfg_uart && uart.magic != UART_MAGIC)
        uart_program();
    w[0] = cfg_pages;
    w[1] = page_gpa(cpu, 0);
    event(EV_READY, cpu, w, 2);
    for (;;) {
        if (cfg_idle) {
            /* Idle until told to write one pass (the harvest benchmark's workload). */
            for (u32 i = 0; i < 20000; i++)
                pause();
            u32 cmd = command(cpu);
            if (cmd == CMD_PASS) {
                for (u32 n = 0; n < cfg_pages; n++)
                    step(s, w);
                w[0] = (u32)s->steps;
                w[1] = (u32)(s->steps >> 32);
                event(EV_PASS_DONE, cpu, w, 2);
            } else if (cmd == CMD_VERIFY) {
                verify(s);
            }
            continue;
        }
        if (cfg_period) {
            u64 now;
            while ((now = rdtsc()) < s->deadline)
                pause();
            /* After a long stop (a migration's downtime) do not burst to catch up. */
            if (now - s->deadline > 64 * cfg_period)
                s->deadline = now;
            s->deadline += cfg_period;
        }
        step(s, w);
        if (((u32)s->steps % POLL_EVERY) == 0) {
            u32 cmd = command(cpu);
            if (cmd == CMD_VERIFY)
                verify(s);
            else if (cmd == CMD_HALT) {
                event(EV_HALTED, cpu, w, 0);
                for (;;)
                    pause();
            } else if (cmd == CMD_FAULT) /* hlt in ring 3: #GP(0), for the reporter's test */
                __asm__ volatile("hlt");
            else if (cmd == CMD_SHUTDOWN) {
                shutdown_requested = 1;
                __asm__ volatile("hlt");
            }
        }
    }
}

/* The vCPUs' ring-3 stacks (entry64.S), 16 KiB each: which vCPU faulted follows from its rsp. */
extern char stacks[];

/* Called in ring 0 by entry64.S's exception stubs; reports and returns to a halt. */
void guest_exception(u64 vector, u64 error, u64 rip, u64 cr2, u64 rsp)
{
    u64 base = (u64)(uptr)stacks;
    if (shutdown_requested) {
        /* A triple fault on purpose (the VMM's test of a vCPU that stops on
         * KVM_EXIT_SHUTDOWN): with an empty IDT neither #UD nor the #DF it raises can be
         * delivered. */
        struct __attribute__((packed)) {
            unsigned short limit;
            u64 base;
        } none = {0, 0};
        __asm__ volatile("lidt %0; ud2" : : "m"(none));
    }
    u32 cpu = rsp > base && rsp <= base + MAX_CPUS * 16384ull ? (u32)((rsp - base - 1) / 16384)
                                                               : 0xff;
    u32 w[6] = {(u32)vector, (u32)error, (u32)rip, (u32)(rip >> 32), (u32)cr2, (u32)(cr2 >> 32)};
    /* The text first: the event is what the VMM waits for. */
    puts("livemig-guest: cpu");
    putu(cpu);
    puts(" exception ");
    putu((u32)vector);
    puts(" error ");
    putu((u32)error);
    puts(" rip ");
    putu((u32)rip);
    puts(" cr2 ");
    putu((u32)cr2);
    puts("\n");
    event(EV_EXCEPTION, cpu, w, 6);
}

void guest_main(u32 mbi, u32 cpu)
{
    if (cpu == 0) {
        parse_cmdline(mbi);
        u32 bad = cfg_cpus == 0 || cfg_cpus > MAX_CPUS || cfg_pages == 0 ||
                  (u64)cfg_cpus * cfg_pages > (WS_BASE - LOG_BASE) / 4;
        if (bad) {
            u32 w[2] = {cfg_cpus, cfg_pages};
            event(EV_CONFIG, 0, w, 2);
            puts("livemig-guest: bad configuration\n");
            for (;;)
                __asm__ volatile("pause");
        }
        puts("livemig-guest: ");
        putu(cfg_cpus);
        puts(" cpu(s), ");
        putu(cfg_pages);
        puts(" pages each\n");
        cfg_ready = 1;
        if (cfg_sipi && cfg_cpus > 1)
            start_aps();
    } else {
        while (!cfg_ready)
            pause();
        if (cpu < cfg_cpus)
            __atomic_fetch_add(&aps_up, 1, __ATOMIC_SEQ_CST);
        if (cpu >= cfg_cpus)
            for (;;)
                __asm__ volatile("pause");
    }
    run(cpu);
}
