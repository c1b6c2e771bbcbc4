/*
 * livemig test guest: entry points.
 *
 * The image is a flat binary loaded at 1 MiB. Its first bytes are a multiboot v1 header with
 * the address fields (flags bit 16; Multiboot Specification 0.6.96, 3.1.3), so a multiboot
 * loader (QEMU -kernel) loads it whatever its format and enters _start32 in 32-bit protected
 * mode (EAX = 0x2BADB002, EBX = multiboot information). _start32 builds identity page tables
 * (4 GiB in 2 MiB pages), enables long mode and continues in 64-bit code.
 *
 * livemig-kvm starts vCPU 0 directly in 64-bit mode at _start64 (named by the "LM64"
 * field after the header) with its own identical page tables: some hypervisors emulate
 * 32-bit guests instruction by instruction (KVM's PVM flavour, which these machines run,
 * executes only 64-bit guests natively). vCPU 0 gets EAX = 0x2BADB002 and EBX = the
 * multiboot information. The others wait for vCPU 0's INIT-SIPI-SIPI and come through
 * ap_tramp below (under QEMU too), or, with livemig-kvm's direct start, begin at _start64
 * like vCPU 0 with EAX = 0x4C4D4150 ("LMAP") and EBX = their index.
 */
    .section .multiboot, "a"
    .align 4
mb_header:
    .long 0x1BADB002
    .long 0x00010000
    .long -(0x1BADB002 + 0x00010000)
    .long mb_header
    .long __load_start
    .long __load_end
    .long __bss_end
    .long _start32
    .ascii "LM64"
    .long _start64

    .section .text.entry, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    movl %ebx, %edi
    movl %eax, %esi
    /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..3; PDk[i] = (k GiB + i * 2 MiB) | PS | U | RW | P */
    movl $boot_pml4, %eax
    movl $boot_pdpt, %edx
    orl $7, %edx
    movl %edx, (%eax)
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $7, %eax             /* present, writable, user */
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax          /* present, writable, user, 2 MiB page */
    movl %eax, boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax          /* PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx   /* IA32_EFER */
    rdmsr
    orl $0x100, %eax         /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax    /* PG | PE */
    movl %eax, %cr0
    lgdt gdt_desc
    ljmp $0x08, $3f
    .code64
3:  movl $0x10, %ecx
    movl %ecx, %ds
    movl %ecx, %es
    movl %ecx, %ss
    movl %esi, %eax
    movl %edi, %ebx
    .globl _start64
_start64:
    cli
    cld
    cmpl $0x2BADB002, %eax
    je 4f
    cmpl $0x4C4D4150, %eax
    je 5f
0:  hlt
    jmp 0b
5:  movl %ebx, %esi          /* vCPU index */
    xorl %edi, %edi
    jmp 6f
4:  movl %ebx, %edi          /* multiboot information */
    xorl %esi, %esi          /* vCPU 0 */
    movq %cr3, %rax          /* the tables the APs' trampoline loads (see ap_tramp) */
    movl %eax, boot_cr3(%rip)
6:  cmpl $8, %esi
    jae 0b
    movl %esi, %eax
    incl %eax
    shll $14, %eax           /* 16 KiB stack per vCPU */
    leaq stacks(%rip), %rdx
    addq %rax, %rdx
    /*
     * The workload runs in ring 3 with IOPL 3 (port I/O allowed, no privileged instruction
     * needed): KVM's PVM flavour runs guest user mode natively but emulates guest kernel mode
     * unless the guest kernel is PVM-aware. iretq frame: SS, RSP, RFLAGS, CS, RIP.
     */
    movq %rdx, %rsp
    /*
     * Exceptions are reported, not fatal in silence: an IDT of 32 interrupt gates to the
     * reporters below (the same table from every vCPU), and RSP0 of this vCPU's TSS (the one
     * livemig-kvm loads for vCPU i is at 0x100 * i, see guest.rs) pointing at its exception
     * stack. Without the gates a fault in the workload is a triple fault, which KVM reports
     * as a shutdown with the vCPU already reset (rip 0xfff0).
     */
    leaq idt(%rip), %r8
    leaq isr_base(%rip), %r9
    xorl %ecx, %ecx
9:  movq %rcx, %r11
    shlq $4, %r11                /* entry and stub: 16 bytes per vector */
    leaq (%r9,%r11), %rax
    movw %ax, (%r8,%r11)         /* offset 15:0 */
    movw $0x08, 2(%r8,%r11)      /* the 64-bit code selector */
    movw $0x8e00, 4(%r8,%r11)    /* present, DPL 0, 64-bit interrupt gate, IST 0 */
    shrq $16, %rax
    movw %ax, 6(%r8,%r11)        /* offset 31:16 */
    shrq $16, %rax
    movl %eax, 8(%r8,%r11)       /* offset 63:32 */
    movl $0, 12(%r8,%r11)
    incl %ecx
    cmpl $32, %ecx
    jb 9b
    lidt idt_desc(%rip)
    movl %esi, %eax
    incl %eax
    shll $12, %eax
    leaq exc_stacks(%rip), %r10
    addq %rax, %r10
    movl %esi, %eax
    shll $8, %eax
    movq %r10, 4(%rax)           /* RSP0: offset 4 of this vCPU's TSS at 0x100 * index */
    pushq $0x23
    pushq %rdx
    pushq $0x3002
    pushq $0x1b
    leaq 7f(%rip), %rax
    pushq %rax
    iretq
7:  call guest_main
8:  pause
    jmp 8b

    /*
     * The application processors' start under INIT-SIPI-SIPI (the guest's `sipi=1`; Intel SDM
     * vol. 3A, 9.4.4 and 10.6.1; AMD APM vol. 2, 16.5): vCPU 0 copies ap_tramp..ap_tramp_end to
     * AP_TRAMP (guest.c) and sends the start-up IPI with vector AP_TRAMP >> 12. Each AP begins
     * in real mode at CS = AP_TRAMP >> 4, IP 0, enters protected mode, then long mode with the
     * BSP's page tables (boot_cr3), loads its own 64-bit TSS and joins _start64 as an AP with
     * its local APIC ID as index. Code and data here are addressed at their copy:
     * AP_TRAMP + (label - ap_tramp).
     */
    .set AP_TRAMP, 0x10000
    .section .rodata.tramp, "a"
    .align 16
    .globl ap_tramp, ap_tramp_end
    .code16
ap_tramp:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tramp_gdt_desc - ap_tramp
    movl %cr0, %eax
    orl $1, %eax                 /* PE */
    movl %eax, %cr0
    ljmpl $0x28, $(AP_TRAMP + tramp32 - ap_tramp)
    .code32
tramp32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl 0xfee00020, %ebx        /* local APIC ID register: the ID in bits 31:24 */
    shrl $24, %ebx
    movl %cr4, %eax
    orl $0x20, %eax              /* PAE */
    movl %eax, %cr4
    movl boot_cr3, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx       /* IA32_EFER */
    rdmsr
    orl $0x100, %eax             /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax        /* PG */
    movl %eax, %cr0
    ljmpl $0x08, $(AP_TRAMP + tramp64 - ap_tramp)
    .code64
tramp64:
    cmpl $8, %ebx
    jae 2f
    movl %ebx, %eax              /* this AP's TSS descriptor: 0x30 + 16 * index */
    shll $4, %eax
    addl $0x30, %eax
    ltr %ax
    movl $0x4C4D4150, %eax
    movabsq $_start64, %rcx
    jmp *%rcx
2:  hlt
    jmp 2b
    .align 8
    /*
     * The same layout as gdt below (0x08 64-bit code, 0x10 data, 0x18/0x20 user), a 32-bit
     * code segment at 0x28 for the protected-mode step, then one 64-bit TSS descriptor per vCPU
     * (base 0x100 * index, as livemig-kvm places them; the guest fills in their I/O bitmap
     * offset, see guest.c). Its limit covers the shared I/O permission bitmap at 0x1000.
     */
tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00affa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00cf9a000000ffff
    .irp i, 0,1,2,3,4,5,6,7
    .word 0x1000 - 0x100 * \i + 0x2000     /* limit 15:0: the bitmap's last byte */
    .word 0x100 * \i                       /* base 15:0 */
    .byte 0                                /* base 23:16 */
    .byte 0x89                             /* present, DPL 0, available 64-bit TSS */
    .byte 0                                /* limit 19:16, flags */
    .byte 0                                /* base 31:24 */
    .long 0                                /* base 63:32 */
    .long 0
    .endr
tramp_gdt_end:
tramp_gdt_desc:
    .word tramp_gdt_end - tramp_gdt - 1
    .long AP_TRAMP + tramp_gdt - ap_tramp
ap_tramp_end:

    .section .text
    /* Exception stubs, 16 bytes apart: an error code (or 0), the vector, the common path. */
    .macro ISR vec
    .align 16
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp isr_common
    .endm
    .align 16
isr_base:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    ISR \v
    .endr
isr_common:
    movq (%rsp), %rdi            /* vector */
    movq 8(%rsp), %rsi           /* error code */
    movq 16(%rsp), %rdx          /* faulting rip */
    movq %cr2, %rcx
    movq 40(%rsp), %r8           /* the interrupted rsp */
    andq $-16, %rsp
    call guest_exception
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .align 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
    .quad 0x00affa000000ffff     /* 0x18: 64-bit user code */
    .quad 0x00cff2000000ffff     /* 0x20: user data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
idt_desc:
    .word 32 * 16 - 1
    .quad idt

    .section .data
    .align 4
    .globl boot_cr3
boot_cr3:
    .long 0

    .section .bss
    .align 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .globl stacks
stacks:
    .skip 8 * 16384
    .align 16
idt:
    .skip 32 * 16
    .align 4096
exc_stacks:
    .skip 8 * 4096

    .section .note.GNU-stack, "", @progbits
