/* Entry point and interrupt stubs of the pvsched guest kernel. The host enters
 * at _start in long mode with rdi = vCPU index, rsi = boot info address and
 * rsp = this vCPU's boot stack. */
    .section .text.start, "ax"
    .globl _start
_start:
    call kmain
1:  cli
    hlt
    jmp 1b

    .text
/* Vectors without an error code push a zero so every frame looks the same. */
.macro STUB vector, has_error
    .globl isr_stub_\vector
isr_stub_\vector:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vector
    jmp isr_common
.endm

.irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,28,31,48,49,255
STUB \v, 0
.endr
.irp v, 8,10,11,12,13,14,17,21,29,30
STUB \v, 1
.endr

isr_common:
    /* Stack: vector, error code, then the CPU's frame. Save the general
       registers below them: the result is a struct interrupt_frame. */
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    /* Keep the stack 16-byte aligned for the call. The kernel is built without
       SSE/x87 code (see build.sh), so there is no FPU state to save. */
    movq %rsp, %rbx
    andq $-16, %rsp
    call isr_dispatch
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

    .section .rodata
    .globl isr_stub_table
    .balign 8
isr_stub_table:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,28,29,30,31,48,49,255
    .quad \v
    .quad isr_stub_\v
.endr
    .quad 0xFFFF
    .quad 0

    .text
/* void context_switch(uint64_t *save_rsp, uint64_t new_rsp): saves the
   callee-saved registers on the current stack, stores its rsp, switches to
   new_rsp and restores that task's callee-saved registers. */
    .globl context_switch
context_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

/* First code of a new task (its initial stack returns here): r12 holds the
   task pointer. Interrupts come on; task_main never returns. */
    .globl task_trampoline
task_trampoline:
    sti
    movq %r12, %rdi
    call task_main
1:  cli
    hlt
    jmp 1b
