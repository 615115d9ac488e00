defmodule Capsid.Trap do
  @moduledoc """
  The guest faulted during a call. The instance recycles itself afterwards
  (fresh store, guest state reset), so the next call runs normally.

  Fields:

    * `kind` — `:out_of_fuel`, `:timeout`, `:memory_limit`, `:stack_overflow`,
      `:unreachable` (a Rust guest's `panic!` ends here), `:memory_out_of_bounds`,
      `:divide_by_zero`, `:integer_overflow`, `:import_failed` (an Elixir import
      raised), `:cancelled` (the calling process died mid-call), `:exit` (the
      guest called WASI's `exit`), or `:other`.
    * `message` — what happened, in words.
    * `backtrace` — wasm frames, innermost first, named where the binary has names.
    * `stderr` — what the guest wrote to stderr during the call (a Rust panic
      message lands here).
    * `status` — for `:exit`, the status the guest gave (WASI 0.2 has only
      success and failure: 0 or 1); `nil` otherwise.
  """

  defexception [:kind, :message, backtrace: [], stderr: "", status: nil]

  @type kind ::
          :out_of_fuel
          | :timeout
          | :memory_limit
          | :stack_overflow
          | :unreachable
          | :memory_out_of_bounds
          | :divide_by_zero
          | :integer_overflow
          | :import_failed
          | :cancelled
          | :exit
          | :other

  @type t :: %__MODULE__{
          kind: kind(),
          message: String.t(),
          backtrace: [String.t()],
          stderr: String.t(),
          status: non_neg_integer() | nil
        }

  @impl true
  def message(%__MODULE__{kind: kind, message: message, stderr: stderr}) do
    case String.trim(stderr) do
      "" -> "(#{kind}) #{message}"
      err -> "(#{kind}) #{message}\nguest stderr: #{err}"
    end
  end
end
